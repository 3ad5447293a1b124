//! The scheduler decodes several requests together, each as it would decode alone: requests
//! join and leave a running batch at any step, with their own sampling settings, seeds, stop
//! strings and cancel switches, and greedy tokens equal the reference's on the goldens (f32).
use crossbeam_channel::{unbounded, Receiver};
use internvl_chat::engine::chat::{ChatInput, Engine, Fit};
use internvl_chat::engine::generate::Flow;
use internvl_chat::engine::protocol::{
    Attachment, Cancel, EngineEvent, Finish, GenerateRequest, Turn,
};
use internvl_chat::engine::scheduler::{Job, Scheduler};
use internvl_chat::model::LoadOptions;
use internvl_chat::sampling::SamplingParams;
use internvl_chat::testutil::fixture;
use serde_json::Value;
use tch::{Device, Kind};

const MODELS: [&str; 4] = [
    "tiny-qwen2",
    "tiny-internlm2",
    "tiny-qwen3",
    "tiny-qwen3-moe",
];

fn engine(model: &str) -> Engine {
    Engine::load(
        &fixture(&format!("models/{model}")),
        &LoadOptions::single(Device::Cpu, Kind::Float),
    )
    .unwrap()
}

fn request(id: u64, question: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        id,
        system: None,
        history: Vec::new(),
        question: question.into(),
        attachments: Vec::new(),
        combine_images: false,
        params,
        stop: Vec::new(),
        truncate_history: false,
    }
}

/// A request's client: its events and its switch.
struct Client {
    id: u64,
    events: Receiver<EngineEvent>,
    cancel: Cancel,
}

/// What a client received: the streamed text, the answer, the finish and its token count.
#[derive(Debug, PartialEq)]
struct Answer {
    streamed: String,
    answer: String,
    finish: Finish,
    completion_tokens: usize,
}

impl Client {
    /// Every event so far, which must be a whole answer: `Started`, `Token`s, `Done`.
    fn answer(&self) -> Answer {
        let events: Vec<EngineEvent> = self.events.try_iter().collect();
        assert!(
            matches!(events.first(), Some(EngineEvent::Started { id, .. }) if *id == self.id),
            "{events:?}"
        );
        let mut streamed = String::new();
        for ev in &events[1..events.len() - 1] {
            match ev {
                EngineEvent::Token { id, text } if *id == self.id => streamed.push_str(text),
                other => panic!("request {}: {other:?}", self.id),
            }
        }
        let Some(EngineEvent::Done { id, answer, stats }) = events.last() else {
            panic!("request {}: no Done: {events:?}", self.id);
        };
        assert_eq!(*id, self.id);
        Answer {
            streamed,
            answer: answer.clone(),
            finish: stats.finish,
            completion_tokens: stats.completion_tokens,
        }
    }
}

fn start(s: &mut Scheduler, req: GenerateRequest) -> Client {
    let (reply, events) = unbounded();
    let cancel = Cancel::new();
    let id = req.id;
    s.start(&Job {
        req,
        reply,
        cancel: cancel.clone(),
    })
    .unwrap();
    Client { id, events, cancel }
}

fn run_out(s: &mut Scheduler) {
    let mut steps = 0;
    while s.running() > 0 {
        s.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "the batch never ends");
    }
}

fn tokens_of(s: &Scheduler, id: u64) -> Vec<u32> {
    s.finished_tokens
        .iter()
        .find(|(i, _)| *i == id)
        .unwrap_or_else(|| panic!("request {id} did not finish"))
        .1
        .clone()
}

/// The request run alone through `Engine::run` (a fresh conversation): tokens and answer.
fn alone(e: &mut Engine, req: &GenerateRequest) -> (Vec<u32>, String, Finish) {
    e.reset();
    let p = e
        .prepare_to_fit(
            &ChatInput {
                system: req.system.as_deref(),
                history: &req.history,
                question: &req.question,
                attachments: &req.attachments,
                combine_images: req.combine_images,
            },
            Fit {
                max_new_tokens: req.params.max_new_tokens,
                truncate_history: false,
            },
        )
        .unwrap();
    let out = e.run(&p, &req.params, &mut |_| Flow::Continue).unwrap();
    (out.tokens, out.answer, out.finish)
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

/// The single-turn request of a golden case (as tests/golden.rs builds it).
fn golden_request(id: u64, g: &Value) -> GenerateRequest {
    let mut attachments: Vec<Attachment> = g["images"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| Attachment::Image {
                    path: fixture(&format!("media/images/{}", i["image"].as_str().unwrap())),
                    max_tiles: Some(i["max_num"].as_u64().unwrap() as usize),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut question = g["question"].as_str().unwrap().to_string();
    if let Some(v) = g["video"].as_str() {
        attachments.push(Attachment::Video {
            path: fixture(&format!("media/videos/{v}")),
            segments: g["num_segments"].as_u64().unwrap() as usize,
            bound: None,
            max_tiles: g["max_num"].as_u64().unwrap() as usize,
        });
        question = question.rsplit_once("<image>\n").unwrap().1.to_string();
    }
    GenerateRequest {
        attachments,
        combine_images: g["combined"].as_bool().unwrap_or(false),
        ..request(id, &question, SamplingParams::greedy(24))
    }
}

/// Steps before the reference's first near-tie (margin < 0.01).
fn steps_to_compare(turn: &Value) -> usize {
    let margins = turn["step_margins"].as_array().unwrap();
    margins
        .iter()
        .position(|m| m.as_f64().unwrap() < 0.01)
        .unwrap_or(margins.len())
}

/// Golden cases join a running batch at different steps (prompts of different lengths, with
/// and without pictures): every one's greedy tokens are the ones it gets alone, and the
/// reference's up to its first near-tie.
#[test]
fn greedy_rows_joining_mid_batch_equal_single_runs_and_the_goldens() {
    let cases = ["text_hello", "image_single", "image_separate", "video"];
    for model in MODELS {
        let goldens: Vec<Value> = cases
            .iter()
            .map(|c| json(&format!("golden/{model}/{c}.json")))
            .collect();
        let reqs: Vec<GenerateRequest> = goldens
            .iter()
            .enumerate()
            .map(|(i, g)| golden_request(i as u64 + 1, g))
            .collect();
        let mut s = Scheduler::new(engine(model));
        s.record_tokens = true;
        let mut clients = vec![start(&mut s, reqs[0].clone())];
        s.step().unwrap();
        s.step().unwrap();
        clients.push(start(&mut s, reqs[1].clone()));
        s.step().unwrap();
        clients.push(start(&mut s, reqs[2].clone()));
        clients.push(start(&mut s, reqs[3].clone()));
        assert_eq!(s.running(), 4, "{model}");
        run_out(&mut s);
        for ((req, g), c) in reqs.iter().zip(&goldens).zip(&clients) {
            let label = format!("{model} {}", cases[req.id as usize - 1]);
            let (want, answer, finish) = alone(&mut s.engine, req);
            let got = tokens_of(&s, req.id);
            assert_eq!(got, want, "{label}: tokens batched vs alone");
            let a = c.answer();
            assert_eq!(
                (a.answer.as_str(), a.finish, a.completion_tokens),
                (answer.as_str(), finish, want.len()),
                "{label}"
            );
            assert_eq!(a.streamed, a.answer, "{label}: streamed text");
            let turn = &g["turns"][0];
            let golden: Vec<u32> = turn["generated_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let n = steps_to_compare(turn);
            assert_eq!(got[..n], golden[..n], "{label}: golden ids up to step {n}");
        }
    }
}

fn endless(max_new: usize) -> SamplingParams {
    SamplingParams {
        min_new_tokens: max_new,
        ..SamplingParams::greedy(max_new)
    }
}

/// A cancelled row leaves at the next step with its partial answer, a row whose client
/// stopped reading leaves too, and the others go on exactly as alone.
#[test]
fn a_cancelled_or_abandoned_row_leaves_and_the_others_are_unaffected() {
    let mut s = Scheduler::new(engine("tiny-qwen2"));
    s.record_tokens = true;
    let reqs = [
        request(1, "Count to ten.", endless(30)),
        request(2, "Describe a cat in detail.", endless(30)),
        request(3, "Hello", endless(30)),
        request(4, "Name three colours.", endless(30)),
    ];
    let mut clients: Vec<Client> = reqs.iter().map(|r| start(&mut s, r.clone())).collect();
    for _ in 0..3 {
        s.step().unwrap();
    }
    clients[1].cancel.cancel();
    s.step().unwrap();
    assert_eq!(s.running(), 3, "the cancelled row left at the next step");
    let a = clients[1].answer();
    assert_eq!((a.finish, a.completion_tokens), (Finish::Cancelled, 5));
    assert_eq!(a.streamed, a.answer);
    // the third client goes away: its row leaves once a send fails
    let abandoned = clients.remove(2);
    drop(abandoned.events);
    let mut steps = 0;
    while s.running() == 3 {
        s.step().unwrap();
        steps += 1;
        assert!(steps < 10, "the abandoned row keeps decoding");
    }
    assert_eq!(s.running(), 2);
    run_out(&mut s);
    assert!(tokens_of(&s, 3).len() < 30);
    for req in [&reqs[0], &reqs[3]] {
        let (want, _, _) = alone(&mut s.engine, req);
        assert_eq!(tokens_of(&s, req.id), want, "request {}", req.id);
    }
    // a partial answer is the prefix of the whole
    let (whole, _, _) = alone(&mut s.engine, &reqs[1]);
    assert_eq!(tokens_of(&s, 2)[..], whole[..5]);
}

/// Rows with their own sampling settings, seeds and stop strings, joining at different steps:
/// each gets what it gets alone.
#[test]
fn each_row_samples_with_its_own_settings_as_alone() {
    let sampled = |seed, temperature, top_p, top_k| SamplingParams {
        do_sample: true,
        temperature,
        top_p,
        top_k,
        seed,
        repetition_penalty: 1.1,
        ..SamplingParams::greedy(20)
    };
    for model in ["tiny-qwen2", "tiny-internlm2"] {
        let mut solo = Scheduler::new(engine(model));
        // a stop string from the middle of what the fourth request says without one
        let rainbow = request(4, "What is a rainbow?", sampled(9, 1.0, 0.9, 20));
        let (_, said, _) = alone(&mut solo.engine, &rainbow);
        let chars: Vec<char> = said.chars().collect();
        assert!(chars.len() >= 8, "{model}: {said:?}");
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let reqs = vec![
            request(1, "Tell me a story.", sampled(7, 0.7, 0.95, 50)),
            request(2, "Tell me a story.", sampled(8, 1.3, 1.0, 0)),
            request(3, "Hello", SamplingParams::greedy(16)),
            GenerateRequest {
                stop: vec![stop.clone()],
                ..rainbow
            },
        ];
        // alone: one request at a time through the scheduler
        solo.record_tokens = true;
        let mut want = Vec::new();
        for r in &reqs {
            let c = start(&mut solo, r.clone());
            run_out(&mut solo);
            want.push((c.answer(), tokens_of(&solo, r.id)));
        }
        // and through Engine::run for those without stop strings: the same tokens
        for r in &reqs[..3] {
            let (tokens, answer, _) = alone(&mut solo.engine, r);
            let w = &want[r.id as usize - 1];
            assert_eq!((&tokens, &answer), (&w.1, &w.0.answer), "{model} {}", r.id);
        }
        let mut s = Scheduler::new(engine(model));
        s.record_tokens = true;
        let mut clients = vec![start(&mut s, reqs[0].clone())];
        s.step().unwrap();
        clients.push(start(&mut s, reqs[1].clone()));
        clients.push(start(&mut s, reqs[2].clone()));
        s.step().unwrap();
        s.step().unwrap();
        clients.push(start(&mut s, reqs[3].clone()));
        run_out(&mut s);
        for (c, w) in clients.iter().zip(&want) {
            let got = (c.answer(), tokens_of(&s, c.id));
            assert_eq!(&got, w, "{model} request {}", c.id);
        }
        assert_eq!(
            want[3].0.finish,
            Finish::Stop,
            "{model}: the stop string ended it"
        );
        assert!(!want[3].0.answer.contains(&stop), "{model}");
        assert!(want[3].0.answer.len() < said.len(), "{model}");
        assert_ne!(want[0].1, want[1].1, "{model}: seeds and settings differ");
    }
}

/// The chat's next turn keeps the conversation's cached prefix even while other requests run,
/// and answers as a fresh conversation would.
#[test]
fn the_next_turn_reuses_the_conversation_cache_in_a_batch() {
    let mut s = Scheduler::new(engine("tiny-qwen2"));
    s.record_tokens = true;
    let image = Attachment::Image {
        path: fixture("media/images/image1.jpg"),
        max_tiles: Some(2),
    };
    let first = GenerateRequest {
        attachments: vec![image.clone()],
        ..request(1, "Describe the image.", SamplingParams::greedy(12))
    };
    let c = start(&mut s, first.clone());
    run_out(&mut s);
    let a = c.answer();
    let (held, _) = s.engine.kv_cache_size();
    assert!(held > 0, "the finished turn's cache is the conversation's");
    // another conversation runs meanwhile; it shares only the system message with the
    // conversation and takes a fresh cache
    let other = start(&mut s, request(2, "Something else entirely.", endless(20)));
    s.step().unwrap();
    let second = GenerateRequest {
        history: vec![Turn {
            question: format!("<image>\n{}", first.question),
            attachments: vec![image],
            answer: a.answer.clone(),
        }],
        ..request(3, "And the colours?", SamplingParams::greedy(12))
    };
    let before = s.prefilled;
    let c2 = start(&mut s, second.clone());
    let prefilled = s.prefilled - before;
    run_out(&mut s);
    let a2 = c2.answer();
    let mut fresh = engine("tiny-qwen2");
    let (tokens, answer, _) = alone(&mut fresh, &second);
    let prompt = fresh
        .prepare(&ChatInput {
            system: None,
            history: &second.history,
            question: &second.question,
            attachments: &[],
            combine_images: false,
        })
        .unwrap()
        .prompt_tokens();
    assert!(
        prefilled < prompt - 256,
        "only the new turn is prefilled: {prefilled} of {prompt}"
    );
    assert_eq!(tokens_of(&s, 3), tokens);
    assert_eq!(a2.answer, answer);
    assert_eq!(other.answer().completion_tokens, 20);
}
