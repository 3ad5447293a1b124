//! The LLM alone against the reference: text-only goldens of the three tiny checkpoints.
use internvl_chat::engine::generate::{generate, Flow, GenInput};
use internvl_chat::model::{InternVL, LoadOptions};
use internvl_chat::sampling::{Sampler, SamplingParams};
use internvl_chat::testutil::fixture;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn load_json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn run_text(model_name: &str, kind: Kind) {
    let model = InternVL::load(
        &fixture(&format!("models/{model_name}")),
        &LoadOptions::single(Device::Cpu, kind),
    )
    .unwrap();
    let g = load_json(&format!("golden/{model_name}/text_hello.json"));
    let turn = &g["turns"][0];
    let input_ids = ids(&turn["input_ids"]);
    let mut cache = model.llm.new_cache();
    let stop = [u32::MAX];
    let out = generate(
        &model,
        &mut cache,
        &GenInput {
            rows: &[input_ids],
            image_embeds: None,
            img_context_id: -1,
            stop_ids: &stop,
            pad_id: 0,
            keep_first_logits: true,
        },
        &mut [Sampler::new(SamplingParams::greedy(24))],
        &mut |_, _| Flow::Continue,
    )
    .unwrap();
    let logits = out.first_logits.unwrap().get(0);
    let st = tch::Tensor::read_safetensors(fixture(&format!(
        "golden/{model_name}/text_hello.safetensors"
    )))
    .unwrap();
    let reference = &st.iter().find(|(n, _)| n == "turn0_first_logits").unwrap().1;
    let diff = (&logits - reference.view([-1])).abs().max().double_value(&[]);
    eprintln!("{model_name} {kind:?}: max |logit diff| = {diff}");
    let gen: Vec<i64> = out.rows[0].tokens.iter().map(|&t| t as i64).collect();
    let golden = ids(&turn["generated_ids"]);
    eprintln!("ours {gen:?}\nref  {golden:?}");
    if kind == Kind::Float {
        assert!(diff < 1e-3);
        assert_eq!(gen, golden);
    } else {
        let cos = Tensor::cosine_similarity(&logits, &reference.view([-1]), 0, 1e-8)
            .double_value(&[]);
        eprintln!("cos {cos}");
        assert!(cos >= 0.995);
    }
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
}

#[test]
fn text_hello_qwen2_f32() {
    run_text("tiny-qwen2", Kind::Float);
}
#[test]
fn text_hello_internlm2_f32() {
    run_text("tiny-internlm2", Kind::Float);
}
#[test]
fn text_hello_vit6b_f32() {
    run_text("tiny-vit6b-qwen2", Kind::Float);
}
#[test]
fn text_hello_qwen2_bf16() {
    run_text("tiny-qwen2", Kind::BFloat16);
}
