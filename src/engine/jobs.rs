//! The queue between the async service and an engine thread.
//!
//! [`Submitter`] is the service's side: it fails fast with [`Capacity::Queue`] when too many
//! replies wait, and hands each reply its event channel and cancel token. Every engine has a
//! prompt thread between the two, which renders the chat template, tokenizes and fits the
//! conversation into the context window ([`prompt::prepare`]): the engine thread receives tokens,
//! and no batched step waits while a long history is tokenized. A prompt that cannot fit ends its
//! reply there, with the same `Failed` event the engine would send. [`Intake`] is the engine
//! thread's side: it blocks while the engine is idle and releases waiting jobs as running slots
//! free up, oldest first.
//!
//! The prompt thread and the engine thread share the engine's [`ChatModel`]. That is safe:
//! llama.cpp's chat templating is a pure function and its tokenizer only reads the vocabulary,
//! which is immutable once the model is loaded (`LlamaModel` is `Send + Sync`); the decoding
//! context, the one thing llama.cpp does not share, stays on the engine thread. Tokenizing in
//! `submit` itself would run native code on the caller's async runtime. One prompt thread rather
//! than a pool keeps jobs in the order they were submitted; a prompt takes milliseconds (about 5
//! for a full 2048-token window with the bundled model), far less than a step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::canvas::Canvas;
use super::prompt::{self, Chunking, Prompt};
use super::vocab::ChatModel;
use super::{
    Capacity, Completion, DecodeOptions, Engine, EngineError, EngineEvent, EngineInfo, GenerateRequest, HistoryWindow,
    Phases, ReplyStream, Revision, StopReason,
};

/// A reply on its way to (or inside) an engine thread, its prompt prepared.
pub(crate) struct Job {
    pub prompt: Prompt,
    pub options: DecodeOptions,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub cancel: CancellationToken,
    pub queued_at: Instant,
    /// When the engine began admitting it.
    pub admitted_at: Option<Instant>,
    /// Where its time went so far; `prompt` is filled in by the prompt thread.
    pub phases: Phases,
    /// Positions unmasked since the last revision sent.
    pub unreported: usize,
}

impl Job {
    /// Whether the client cancelled or stopped listening.
    pub fn abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    pub fn fail(&self, error: EngineError) {
        let _ = self.events.send(EngineEvent::Failed(error));
    }

    /// After a step that unmasked `unmasked` positions: sends the whole reply when `revise` (or
    /// when the reply is complete), and the completion once nothing is masked. Returns whether
    /// the reply goes on.
    pub fn report_step(
        &mut self,
        canvas: &Canvas,
        chat: &ChatModel,
        placeholder: &str,
        unmasked: usize,
        revise: bool,
    ) -> bool {
        self.unreported += unmasked;
        let complete = canvas.is_complete();
        if revise || complete {
            let revision = Revision {
                step: canvas.steps(),
                text: chat.render(canvas.tokens(), canvas.reply_len(), placeholder),
                masked: canvas.masked(),
                unmasked: std::mem::take(&mut self.unreported),
            };
            if self.events.send(EngineEvent::Revision(revision)).is_err() {
                return false;
            }
        }
        if complete {
            self.finish(canvas, chat, StopReason::Completed);
            return false;
        }
        true
    }

    /// Ends the reply with what `canvas` holds.
    pub fn finish(&self, canvas: &Canvas, chat: &ChatModel, reason: StopReason) {
        let text = chat.render(canvas.tokens(), canvas.reply_len(), "");
        let mut phases = self.phases;
        let inside = self.admitted_at.map_or(Duration::ZERO, |at| at.elapsed());
        phases.between_steps = inside.saturating_sub(phases.prefill + phases.denoise + phases.revision);
        crate::metrics::reply_phases(&phases);
        let _ = self.events.send(EngineEvent::Finished(Completion {
            reason,
            text,
            completion_tokens: canvas.reply_len(),
            steps: canvas.steps(),
            phases,
        }));
    }
}

/// What an engine thread reports once its model is loaded.
pub(crate) struct Loaded {
    pub info: EngineInfo,
    /// The template and tokenizer the prompt thread prepares prompts with.
    pub chat: Arc<ChatModel>,
    /// The chunk boundaries the engine wants in its prompts (it caches them chunk by chunk).
    pub chunking: Chunking,
}

/// An engine running on its own thread, fed by the queue.
pub(crate) struct EngineThread {
    submitter: Submitter,
    info: EngineInfo,
}

impl Engine for EngineThread {
    fn submit(&self, request: GenerateRequest) -> Result<ReplyStream, EngineError> {
        self.submitter.submit(request)
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }
}

/// Runs `body` on a new thread called `name`: it loads the model, reports the outcome through its
/// second argument, then serves the queue. Once the model is loaded, starts the prompt thread in
/// front of the queue. Returns once the model is loaded (or failed to load).
pub(crate) fn spawn<F>(
    name: &str,
    max_waiting: usize,
    history_window: HistoryWindow,
    body: F,
) -> Result<EngineThread, EngineError>
where
    F: FnOnce(Intake, &dyn Fn(Result<Loaded, EngineError>)) + Send + 'static,
{
    let no_thread = |e: std::io::Error| EngineError::Load {
        path: String::new(),
        reason: e.to_string(),
    };
    let waiting = Arc::new(AtomicUsize::new(0));
    let (jobs, queued) = std_mpsc::channel();
    let intake = Intake {
        jobs: queued,
        waiting: waiting.clone(),
        queue: VecDeque::new(),
        open: true,
    };
    let (ready_tx, ready_rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            body(intake, &|outcome| {
                let _ = ready_tx.send(outcome);
            })
        })
        .map_err(no_thread)?;
    let Loaded {
        mut info,
        chat,
        chunking,
    } = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
    let context = info.context_length;
    // A window as large as the context changes nothing.
    info.history_window = history_window
        .tokens(chat.trained_prompt_tokens)
        .filter(|&window| window < context);
    let window = info.history_window;
    if let Some(tokens) = window {
        tracing::info!(
            tokens,
            "conversations are fitted into the history window (model.history_window)"
        );
    }
    let (requests, pending) = std_mpsc::channel();
    let prompts_waiting = waiting.clone();
    std::thread::Builder::new()
        .name(format!("{name}-prompts"))
        .spawn(move || prepare_prompts(pending, jobs, &chat, context, window, chunking, &prompts_waiting))
        .map_err(no_thread)?;
    Ok(EngineThread {
        submitter: Submitter {
            requests,
            waiting,
            max_waiting,
        },
        info,
    })
}

/// A submitted reply on its way to the prompt thread.
struct Pending {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<EngineEvent>,
    cancel: CancellationToken,
    queued_at: Instant,
}

/// The prompt thread: prepares each submitted reply's prompt and queues it for the engine, until
/// every [`Submitter`] is gone (then dropping `jobs` tells the engine thread no more will come).
fn prepare_prompts(
    pending: std_mpsc::Receiver<Pending>,
    jobs: std_mpsc::Sender<Job>,
    chat: &ChatModel,
    context: usize,
    window: Option<usize>,
    chunking: Chunking,
    waiting: &AtomicUsize,
) {
    for p in pending {
        let preparing = Instant::now();
        match prompt::prepare(chat, &p.request, context, window, chunking) {
            Ok(prompt) => {
                let job = Job {
                    prompt,
                    options: p.request.options,
                    events: p.events,
                    cancel: p.cancel,
                    queued_at: p.queued_at,
                    admitted_at: None,
                    unreported: 0,
                    phases: Phases {
                        prompt: preparing.elapsed(),
                        ..Phases::default()
                    },
                };
                if jobs.send(job).is_err() {
                    return;
                }
            }
            Err(e) => {
                let left = waiting.fetch_sub(1, Ordering::AcqRel) - 1;
                crate::metrics::engine_load(None, Some(left));
                let _ = p.events.send(EngineEvent::Failed(e));
            }
        }
    }
}

pub(crate) struct Submitter {
    requests: std_mpsc::Sender<Pending>,
    /// Replies submitted and not yet started (their prompts being prepared, or queued).
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl Submitter {
    pub fn submit(&self, request: GenerateRequest) -> Result<ReplyStream, EngineError> {
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded(Capacity::Queue { waiting }));
        }
        let (events, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let pending = Pending {
            request,
            events,
            cancel: cancel.clone(),
            queued_at: Instant::now(),
        };
        if self.requests.send(pending).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        crate::metrics::engine_load(None, Some(waiting + 1));
        Ok(ReplyStream { events: rx, cancel })
    }
}

pub(crate) struct Intake {
    jobs: std_mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    queue: VecDeque<Job>,
    /// False once every `Submitter` is gone.
    open: bool,
}

impl Intake {
    /// The jobs that may start now, at most `free`. Blocks while `running` is zero and nothing
    /// waits. `None` means the engine should stop: no replies run, none wait and no more can come.
    pub fn take(&mut self, running: usize, free: usize) -> Option<Vec<Job>> {
        if running == 0 && self.queue.is_empty() {
            if !self.open {
                return None;
            }
            match self.jobs.recv() {
                Ok(job) => self.queue.push_back(job),
                Err(_) => return None,
            }
        }
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.queue.push_back(job),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    self.open = false;
                    break;
                }
            }
        }
        let n = free.min(self.queue.len());
        self.waiting.fetch_sub(n, Ordering::AcqRel);
        let started: Vec<Job> = self.queue.drain(..n).collect();
        crate::metrics::engine_load(
            Some(running + started.len()),
            Some(self.waiting.load(Ordering::Relaxed)),
        );
        Some(started)
    }
}
