//! The one loop every engine thread runs: take jobs from the queue as running slots free up,
//! admit them, sweep out replies nobody waits for any more (cancelled, or the receiver dropped),
//! step the running replies, a pass of at most `limits.replies_per_evaluation` at a time, and
//! hand back what a finished one held.
//!
//! Engines differ only in what a running reply holds and how a step is computed; that is the
//! [`Backend`] trait. The cached engine computes a pass's steps in one batched graph evaluation,
//! the reference engine one decode after another; either way each reply's revision goes out as
//! soon as its step is done.

use std::time::{Duration, Instant};

use super::canvas::Canvas;
use super::jobs::{Intake, Job};
use super::vocab::ChatModel;
use super::{EngineError, EngineEvent, StopReason};

/// What one engine implementation does with the replies the scheduler runs.
pub(crate) trait Backend {
    /// What a running reply holds in the engine besides its canvas (a conversation cache, say).
    type State;

    /// Whether revisions show the masked positions (as the placeholder). An autoregressive
    /// reply has nothing masked to show: its revisions are what it wrote so far.
    const SHOWS_MASKS: bool = true;

    /// Steps between two revisions sent (the last step always sends one).
    fn steps_per_revision(&self) -> usize {
        1
    }

    /// Starts `job`'s reply (its prefill, where there is one). Returns its state and how many
    /// prompt tokens were already cached.
    fn admit(&mut self, job: &Job) -> Result<(Self::State, usize), EngineError>;

    /// Advances every reply in `replies` by one denoising step and calls `stepped` for each,
    /// as soon as its step is done, with the positions the step unmasked or the error that ends
    /// the reply.
    fn step(&mut self, replies: &mut [Running<Self::State>], stepped: &mut dyn FnMut(&mut Running<Self::State>, Step));

    /// The reply ended (finished, failed, cancelled or its receiver dropped); what it held may
    /// serve another.
    fn release(&mut self, state: Self::State);
}

/// The outcome of one reply's step, or why the reply failed.
pub(crate) type Step = Result<Stepped, EngineError>;

/// One reply's step as the backend computed it.
pub(crate) struct Stepped {
    /// Positions the step unmasked.
    pub unmasked: usize,
    /// Time the reply's step spent in the model's evaluation (a batched evaluation counts whole
    /// for every reply in it).
    pub compute: Duration,
    /// The arithmetic of the reply's own part of the evaluation, in floating-point operations.
    pub flops: f64,
}

/// A reply in progress.
pub(crate) struct Running<S> {
    pub job: Job,
    pub canvas: Canvas,
    pub state: S,
    /// Cleared once the reply ended: reported finished, failed, or its receiver went away.
    live: bool,
}

/// Serves `intake` with `backend` until no replies run, none wait and no more can come.
/// `chat` renders revisions; `placeholder` stands for each masked position in them. At most
/// `per_evaluation` replies (0: all that run) step together; the others step in the next pass.
pub(crate) fn run<B: Backend>(
    mut backend: B,
    mut intake: Intake,
    chat: &ChatModel,
    placeholder: &str,
    max_running: usize,
    per_evaluation: usize,
) {
    let max_running = max_running.max(1);
    let placeholder = if B::SHOWS_MASKS { placeholder } else { "" };
    let every = backend.steps_per_revision().max(1);
    let pass_len = |stepping: usize| match per_evaluation {
        0 => stepping,
        n => n.min(stepping),
    };
    let mut replies: Vec<Running<B::State>> = Vec::new();
    while let Some(jobs) = intake.take(replies.len(), max_running - replies.len()) {
        let mut arrived: Vec<Running<B::State>> = jobs
            .into_iter()
            .filter_map(|job| admit(&mut backend, job, chat))
            .collect();
        // A reply that arrives while others run takes its first step at once, on its own: its first
        // revision then waits for its prefill and one small step, not for a step of every reply.
        if !replies.is_empty() {
            while !arrived.is_empty() {
                let mut first: Vec<_> = arrived.drain(..pass_len(arrived.len())).collect();
                step_all(&mut backend, &mut first, chat, placeholder, every);
                replies.extend(first);
            }
        }
        replies.extend(arrived);
        let (gone, running): (Vec<_>, Vec<_>) = std::mem::take(&mut replies)
            .into_iter()
            .partition(|r| r.job.abandoned());
        for r in gone {
            r.job.finish(&r.canvas, chat, StopReason::Cancelled);
            backend.release(r.state);
        }
        replies = running;
        // Between two passes new replies are admitted and take their first step, so an arrival
        // waits for one pass, not for a step of every running reply. The replies just stepped
        // go to the back.
        if !replies.is_empty() {
            let mut stepping: Vec<_> = replies.drain(..pass_len(replies.len())).collect();
            step_all(&mut backend, &mut stepping, chat, placeholder, every);
            replies.extend(stepping);
        }
    }
}

/// One step of every reply in `replies`, each revision reported as soon as its step is done;
/// replies that ended leave `replies` and hand back what they held.
fn step_all<B: Backend>(
    backend: &mut B,
    replies: &mut Vec<Running<B::State>>,
    chat: &ChatModel,
    placeholder: &str,
    every: usize,
) {
    let step_started = Instant::now();
    backend.step(replies, &mut |r, step| {
        r.job.phases.denoise += step_started.elapsed();
        r.live = match step {
            Ok(stepped) => {
                r.job.phases.compute += stepped.compute;
                r.job.phases.step_flops += stepped.flops;
                let building = Instant::now();
                let revise = r.canvas.steps() % every == 0;
                let live = r
                    .job
                    .report_step(&r.canvas, chat, placeholder, stepped.unmasked, revise);
                r.job.phases.revision += building.elapsed();
                live
            }
            Err(e) => {
                r.job.fail(e);
                false
            }
        };
    });
    let (live, ended): (Vec<_>, Vec<_>) = std::mem::take(replies).into_iter().partition(|r| r.live);
    for r in ended {
        backend.release(r.state);
    }
    *replies = live;
}

/// Starts `job` and announces it; `None` when it failed or nobody listens any more.
fn admit<B: Backend>(backend: &mut B, mut job: Job, chat: &ChatModel) -> Option<Running<B::State>> {
    let admitting = Instant::now();
    job.phases.queue = admitting
        .duration_since(job.queued_at)
        .saturating_sub(job.phases.prompt);
    job.admitted_at = Some(admitting);
    let (state, cached_tokens) = match backend.admit(&job) {
        Ok(admitted) => admitted,
        Err(e) => {
            job.fail(e);
            return None;
        }
    };
    job.phases.prefill = admitting.elapsed();
    let started = EngineEvent::Started {
        prompt_tokens: job.prompt.tokens.len(),
        cached_tokens,
        dropped_turns: job.prompt.dropped_turns,
        queue_wait: job.phases.queue,
    };
    if job.events.send(started).is_err() {
        backend.release(state);
        return None;
    }
    let canvas = Canvas::new(&job.options, chat.mask, chat.end_tokens.clone()).with_pieces(chat.pieces.clone());
    Some(Running {
        job,
        canvas,
        state,
        live: true,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use ggml_ext::runtime::TopK;

    use super::*;
    use crate::engine::jobs;
    use crate::engine::policy::{Schedule, Selection};
    use crate::engine::prompt::Chunking;
    use crate::engine::vocab::Family;
    use crate::engine::{ChatTurn, DecodeOptions, Engine, EngineInfo, GenerateRequest, HistoryWindow};

    /// Steps every reply by one position, slowly, and records which replies (by canvas length)
    /// each step evaluated together.
    struct Recorder {
        steps: Arc<Mutex<Vec<Vec<usize>>>>,
    }

    /// A token of the fixture's vocabulary that neither ends a reply nor masks.
    const WORD: i32 = 70;

    impl Backend for Recorder {
        type State = ();

        fn admit(&mut self, _: &Job) -> Result<((), usize), EngineError> {
            Ok(((), 0))
        }

        fn step(&mut self, replies: &mut [Running<()>], stepped: &mut dyn FnMut(&mut Running<()>, Step)) {
            let together = replies.iter().map(|r| r.job.options.max_tokens).collect();
            self.steps.lock().unwrap().push(together);
            std::thread::sleep(Duration::from_millis(3));
            for r in replies.iter_mut() {
                let active = r.canvas.active_positions();
                let top = TopK {
                    tokens: vec![WORD],
                    probs: vec![1.0],
                    entropy: 0.0,
                };
                let unmasked = r.canvas.step_top_k(&active, &vec![top; active.len()]);
                let (compute, flops) = (Duration::ZERO, 0.0);
                stepped(
                    r,
                    Ok(Stepped {
                        unmasked,
                        compute,
                        flops,
                    }),
                );
            }
        }

        fn release(&mut self, _: ()) {}
    }

    fn request(max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            system: "You are a test.".into(),
            turns: vec![ChatTurn {
                role: "user".into(),
                content: "hello".into(),
            }],
            options: DecodeOptions {
                max_tokens,
                steps: max_tokens,
                block_length: max_tokens,
                schedule: Schedule::Fixed,
                selection: Selection::Confidence,
                defer_repeats: false,
                temperature: 0.0,
                seed: 1,
                fill_canvas: false,
            },
        }
    }

    fn finished(stream: &mut crate::engine::ReplyStream) {
        while let Some(event) = stream.events.blocking_recv() {
            match event {
                EngineEvent::Finished(_) => return,
                EngineEvent::Failed(e) => panic!("{e}"),
                _ => {}
            }
        }
        panic!("the engine stopped");
    }

    /// A scheduler over the recording backend; `steps` receives what each evaluation held.
    fn recorded(per_evaluation: usize, steps: Arc<Mutex<Vec<Vec<usize>>>>) -> impl Engine {
        let path = crate::models::fixture_in(&std::env::temp_dir().join("dllm-chat-tests")).unwrap();
        let recorder = Recorder { steps };
        jobs::spawn("scheduler-test", 8, HistoryWindow::Off, move |intake, ready| {
            let chat = match ChatModel::load(&path, true, Family::Diffusion) {
                Ok(chat) => Arc::new(chat),
                Err(e) => return ready(Err(e)),
            };
            ready(Ok(jobs::Loaded {
                info: EngineInfo {
                    engine: "recorder",
                    model_path: path.display().to_string(),
                    architecture: chat.architecture.clone(),
                    context_length: 1024,
                    history_window: None,
                },
                chat: chat.clone(),
                chunking: Chunking::None,
            }));
            run(recorder, intake, &chat, "_", 4, per_evaluation);
        })
        .unwrap()
    }

    #[test]
    fn a_reply_arriving_while_others_run_takes_its_first_step_alone() {
        let steps = Arc::new(Mutex::new(Vec::new()));
        let engine = recorded(0, steps.clone());
        // A long reply of 40 one-token steps, then a short one of 3 while it runs.
        let mut long = engine.submit(request(40)).unwrap();
        assert!(matches!(long.events.blocking_recv(), Some(EngineEvent::Started { .. })));
        assert!(matches!(long.events.blocking_recv(), Some(EngineEvent::Revision(_))));
        let mut short = engine.submit(request(3)).unwrap();
        finished(&mut short);
        finished(&mut long);
        let steps = steps.lock().unwrap();
        let first = steps
            .iter()
            .position(|s| s.contains(&3))
            .expect("the short reply was stepped");
        assert_eq!(steps[first], vec![3], "its first step is its own: {steps:?}");
        assert_eq!(steps[first + 1], vec![40, 3], "then it joins the batch: {steps:?}");
        assert!(
            steps[first + 2..].iter().any(|s| s == &vec![40]),
            "the long reply went on"
        );
    }

    #[test]
    fn at_most_per_evaluation_replies_step_together_and_every_one_goes_on() {
        for (per_evaluation, most) in [(2, 2), (0, 3)] {
            let steps = Arc::new(Mutex::new(Vec::new()));
            let engine = recorded(per_evaluation, steps.clone());
            let mut first = engine.submit(request(30)).unwrap();
            assert!(matches!(
                first.events.blocking_recv(),
                Some(EngineEvent::Started { .. })
            ));
            assert!(matches!(first.events.blocking_recv(), Some(EngineEvent::Revision(_))));
            let mut others = [engine.submit(request(20)).unwrap(), engine.submit(request(10)).unwrap()];
            for stream in others.iter_mut().chain([&mut first]) {
                finished(stream);
            }
            let steps = steps.lock().unwrap();
            let largest = steps.iter().map(Vec::len).max().unwrap();
            assert_eq!(largest, most, "per_evaluation {per_evaluation}: {steps:?}");
            for length in [30, 20, 10] {
                let stepped = steps.iter().filter(|s| s.contains(&length)).count();
                assert_eq!(
                    stepped, length,
                    "per_evaluation {per_evaluation}: reply {length} took every step"
                );
            }
        }
    }
}
