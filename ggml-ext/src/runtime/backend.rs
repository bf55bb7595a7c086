//! The compute device: a ggml backend (CPU, or a GPU when the crate is built with `cuda`) and the
//! backend scheduler that allocates and runs our graphs on it, falling back to the CPU for any
//! operation the GPU backend lacks.

use std::ffi::CStr;

use llama_cpp_sys_2 as sys;

use super::RuntimeError;

/// Where the weights, caches and graphs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The first GPU ggml knows about (needs a build with the `cuda` feature).
    Gpu,
}

/// Owns the backends and the scheduler. Weights and caches are allocated on `primary`; the
/// scheduler starts once the weights are loaded, since its size depends on the layer count.
pub(crate) struct Backend {
    primary: sys::ggml_backend_t,
    /// The CPU backend, also `primary` on CPU-only runs; last in the scheduler's list as ggml requires.
    cpu: sys::ggml_backend_t,
    sched: sys::ggml_backend_sched_t,
    /// The CPU backend's worker threads, kept across evaluations; null with one thread.
    threadpool: *mut sys::ggml_threadpool,
    graph_size: usize,
    description: String,
}

// SAFETY: ggml backends and schedulers are plain heap objects with no thread affinity; the `Backend`
// is only ever used by one thread at a time (it is moved into the engine thread, never shared).
unsafe impl Send for Backend {}

impl Backend {
    /// Starts the backends (the scheduler comes with [`Self::start_scheduler`]).
    pub(crate) fn new(device: Device, threads: usize) -> Result<Self, RuntimeError> {
        // SAFETY: plain constructor; a null return is handled.
        let cpu = unsafe { sys::ggml_backend_cpu_init() };
        if cpu.is_null() {
            return Err(RuntimeError::Device("the CPU backend failed to start".into()));
        }
        // SAFETY: `cpu` is a live CPU backend.
        unsafe { sys::ggml_backend_cpu_set_n_threads(cpu, threads.max(1) as i32) };
        // Without a pool of its own the CPU backend starts and joins its worker threads at every
        // evaluation: a denoising step of a few milliseconds is several evaluations, and each
        // waits for a new thread to be scheduled (on two busy cores, at times far longer than
        // the step's arithmetic).
        let threadpool = if threads > 1 {
            // SAFETY: plain constructors; a null pool is handled, and `cpu` uses the pool until
            // it is freed in `drop`, after the backend.
            unsafe {
                let mut params = sys::ggml_threadpool_params_default(threads as i32);
                // Idle workers sleep at once instead of spinning for the next evaluation: on two
                // cores a spinning worker takes the core the server, the prompt thread or another
                // engine needs (the bench's cases ran 2x slower after another engine's turn),
                // and waking it costs no measurable time per step (`step_cost`).
                params.poll = 0;
                let pool = sys::ggml_threadpool_new(&mut params);
                if pool.is_null() {
                    sys::ggml_backend_free(cpu);
                    return Err(RuntimeError::Device("the CPU thread pool failed to start".into()));
                }
                sys::ggml_backend_cpu_set_threadpool(cpu, pool);
                pool
            }
        } else {
            std::ptr::null_mut()
        };
        let primary = match device {
            Device::Cpu => cpu,
            Device::Gpu => {
                // SAFETY: the registry lookups return null when no such device is compiled in.
                let dev = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_GPU) };
                let gpu = if dev.is_null() {
                    std::ptr::null_mut()
                } else {
                    // SAFETY: `dev` is a registered device; null params select its defaults.
                    unsafe { sys::ggml_backend_dev_init(dev, std::ptr::null()) }
                };
                if gpu.is_null() {
                    // SAFETY: `cpu` and the pool were created above and are not used afterwards.
                    unsafe {
                        sys::ggml_backend_free(cpu);
                        if !threadpool.is_null() {
                            sys::ggml_threadpool_free(threadpool);
                        }
                    }
                    return Err(RuntimeError::Device(
                        "no GPU backend is available (build with the `cuda` feature on a machine with a GPU)".into(),
                    ));
                }
                gpu
            }
        };
        // SAFETY: `primary` is live; ggml returns a static NUL-terminated name.
        let name = unsafe { CStr::from_ptr(sys::ggml_backend_name(primary)) }
            .to_string_lossy()
            .into_owned();
        Ok(Self {
            primary,
            cpu,
            sched: std::ptr::null_mut(),
            threadpool,
            graph_size: 0,
            description: format!("{name} ({} threads)", threads.max(1)),
        })
    }

    /// Starts the scheduler for graphs of at most `graph_size` nodes.
    pub(crate) fn start_scheduler(&mut self, graph_size: usize) -> Result<(), RuntimeError> {
        let mut backends = if self.primary == self.cpu {
            vec![self.cpu]
        } else {
            vec![self.primary, self.cpu]
        };
        // SAFETY: `backends` holds live backends, CPU last; null buffer types select each default.
        self.sched = unsafe {
            sys::ggml_backend_sched_new(
                backends.as_mut_ptr(),
                std::ptr::null_mut(),
                backends.len() as i32,
                graph_size,
                false,
                true,
            )
        };
        if self.sched.is_null() {
            return Err(RuntimeError::Device("the backend scheduler failed to start".into()));
        }
        self.graph_size = graph_size;
        Ok(())
    }

    pub(crate) fn primary(&self) -> sys::ggml_backend_t {
        self.primary
    }

    pub(crate) fn sched(&self) -> sys::ggml_backend_sched_t {
        self.sched
    }

    pub(crate) fn graph_size(&self) -> usize {
        self.graph_size
    }

    pub(crate) fn description(&self) -> &str {
        &self.description
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: each pointer was created in `new`, is freed exactly once here, and the scheduler
        // goes before the backends it references, the CPU backend before its thread pool.
        unsafe {
            if !self.sched.is_null() {
                sys::ggml_backend_sched_free(self.sched);
            }
            if self.primary != self.cpu {
                sys::ggml_backend_free(self.primary);
            }
            sys::ggml_backend_free(self.cpu);
            if !self.threadpool.is_null() {
                sys::ggml_threadpool_free(self.threadpool);
            }
        }
    }
}
