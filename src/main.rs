fn main() {
    println!("internvl-chat");
}
