//! The time budget: how many steps a run plans so that it ends within its wall-clock minutes.
//!
//! A run with `max_minutes` starts out planning its full step count. Every [`TIMED_STEPS`] steps it times
//! the last window of steps (the recent speed, since the machine may be shared) and re-plans to the steps
//! that fit in the time left, never fewer than it has done nor more than the config's step count; the
//! learning-rate schedule follows the plan. A step that ends past the budget stops the run there. Time is
//! passed in, so [`TimeBudget`] is pure.

use std::time::Duration;

/// Steps in one timing window: the plan is re-made after every this many steps.
const TIMED_STEPS: usize = 20;

/// A wall-clock budget for a run of at most `max_steps` steps, and the timing window in progress.
#[derive(Debug, Clone)]
pub(super) struct TimeBudget {
    budget: Duration,
    max_steps: usize,
    /// Time since the run started at the start of the current timing window.
    window_start: Duration,
}

/// What a finished step means for the plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct BudgetCheck {
    /// The steps the run plans now: the step just finished when the run must stop.
    pub planned: usize,
    /// Set when the step closed a timing window and the steps that fit differ from the plan before.
    pub replan: Option<Replan>,
    /// The budget ran out before the plan did, so the run stops at this step.
    pub exhausted: bool,
}

/// A new plan made from the speed of the last timing window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Replan {
    pub planned: usize,
    pub seconds_per_step: f64,
    /// Worth a log line: the first window's plan, and every tenth window's after it.
    pub announce: bool,
}

impl TimeBudget {
    /// A budget of `minutes` (finite, not negative) for a run of at most `max_steps` steps.
    pub(super) fn from_minutes(minutes: f64, max_steps: usize) -> Self {
        TimeBudget {
            budget: Duration::from_secs_f64(minutes * 60.0),
            max_steps,
            window_start: Duration::ZERO,
        }
    }

    pub(super) fn minutes(&self) -> f64 {
        self.budget.as_secs_f64() / 60.0
    }

    /// Checks the plan after step `step` (counted from 1, at most `max_steps`) has finished, `elapsed` after
    /// the run started (never less than at the step before), with `planned` steps planned so far.
    pub(super) fn after_step(&mut self, step: usize, elapsed: Duration, planned: usize) -> BudgetCheck {
        let mut planned = planned;
        let mut replan = None;
        if step % TIMED_STEPS == 0 {
            let per_step = (elapsed - self.window_start).as_secs_f64() / TIMED_STEPS as f64;
            self.window_start = elapsed;
            let left = (self.budget.as_secs_f64() - elapsed.as_secs_f64()).max(0.0);
            // Saturating: a window timed at zero seconds fits unboundedly many steps.
            let fit = step.saturating_add((left / per_step) as usize);
            let fit = fit.clamp(step, self.max_steps);
            if fit != planned {
                planned = fit;
                replan = Some(Replan {
                    planned,
                    seconds_per_step: per_step,
                    announce: step == TIMED_STEPS || step % (TIMED_STEPS * 10) == 0,
                });
            }
        }
        let exhausted = elapsed >= self.budget && step < planned;
        if exhausted {
            planned = step;
        }
        BudgetCheck {
            planned,
            replan,
            exhausted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Runs `budget` through steps `1..=steps`, each `seconds_per_step` long, starting from `planned`;
    /// stops early when the plan is reached. Returns the last check.
    fn run(budget: &mut TimeBudget, steps: usize, seconds_per_step: f64, mut planned: usize) -> BudgetCheck {
        let mut last = None;
        for step in 1..=steps {
            let check = budget.after_step(step, secs(step as f64 * seconds_per_step), planned);
            planned = check.planned;
            last = Some(check);
            if step >= planned {
                break;
            }
        }
        last.expect("at least one step")
    }

    #[test]
    fn a_budget_with_room_keeps_the_plan_between_windows() {
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        for step in 1..TIMED_STEPS {
            let check = budget.after_step(step, secs(step as f64 * 0.1), 1000);
            assert_eq!(
                check,
                BudgetCheck {
                    planned: 1000,
                    replan: None,
                    exhausted: false
                }
            );
        }
    }

    #[test]
    fn the_first_window_plans_the_steps_that_fit() {
        // 20 steps in 20 s, 40 s left at 1 s a step: 60 steps in all.
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        let check = run(&mut budget, TIMED_STEPS, 1.0, 1000);
        let replan = check.replan.expect("re-planned");
        assert_eq!(check.planned, 60);
        assert_eq!(replan.planned, 60);
        assert!((replan.seconds_per_step - 1.0).abs() < 1e-9);
        assert!(replan.announce);
        assert!(!check.exhausted);
    }

    #[test]
    fn the_plan_never_passes_the_configured_steps() {
        // 0.01 s a step would fit about 6000 steps in the minute.
        let mut budget = TimeBudget::from_minutes(1.0, 500);
        let check = run(&mut budget, TIMED_STEPS, 0.01, 500);
        assert_eq!(check.planned, 500);
        // Already planning all 500 steps: nothing changed, nothing to report.
        assert_eq!(check.replan, None);
        // From a smaller plan it grows back to the cap.
        let mut budget = TimeBudget::from_minutes(1.0, 500);
        let check = run(&mut budget, TIMED_STEPS, 0.01, 100);
        assert_eq!(check.planned, 500);
        assert_eq!(check.replan.map(|r| r.planned), Some(500));
    }

    #[test]
    fn each_window_re_plans_from_its_own_speed() {
        let mut budget = TimeBudget::from_minutes(100.0 / 60.0, 1000);
        // 20 steps at 2 s: 60 s left fit 30 more.
        let first = budget.after_step(20, secs(40.0), 1000);
        assert_eq!(first.planned, 50);
        // The next 20 steps take 10 s (0.5 s a step, not the 1.25 s average): 50 s left fit 100 more.
        let second = budget.after_step(40, secs(50.0), first.planned);
        assert_eq!(second.planned, 140);
        let replan = second.replan.expect("re-planned");
        assert!((replan.seconds_per_step - 0.5).abs() < 1e-9);
        // Only the first window and every tenth one are announced.
        assert!(!replan.announce);
        let mut budget = TimeBudget::from_minutes(1000.0, 100_000);
        assert!(budget.after_step(200, secs(200.0), 1).replan.unwrap().announce);
        assert!(!budget.after_step(220, secs(220.0), 1).replan.unwrap().announce);
    }

    #[test]
    fn an_exhausted_budget_stops_the_run_at_the_step() {
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        // Between windows: the step that ends at or past the budget is the last.
        let check = budget.after_step(7, secs(60.0), 1000);
        assert_eq!(
            check,
            BudgetCheck {
                planned: 7,
                replan: None,
                exhausted: true
            }
        );
        // Just before it, the run goes on.
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        let check = budget.after_step(7, secs(59.9), 1000);
        assert!(!check.exhausted);
        assert_eq!(check.planned, 1000);
    }

    #[test]
    fn a_window_that_ends_past_the_budget_plans_no_more_steps() {
        // The re-plan already cuts the plan to this step, so the run stops without `exhausted`.
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        let check = budget.after_step(20, secs(70.0), 1000);
        assert_eq!(check.planned, 20);
        assert_eq!(check.replan.map(|r| r.planned), Some(20));
        assert!(!check.exhausted);
        // Time left but less than one step: the same.
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        assert_eq!(budget.after_step(20, secs(59.5), 1000).planned, 20);
    }

    #[test]
    fn the_last_planned_step_is_not_cut_short() {
        // The budget runs out on the step the plan ends with: the plan ran out first.
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        let check = budget.after_step(37, secs(61.0), 37);
        assert_eq!(check.planned, 37);
        assert!(!check.exhausted);
    }

    #[test]
    fn a_window_timed_at_zero_plans_every_step() {
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        let check = budget.after_step(20, Duration::ZERO, 100);
        assert_eq!(check.planned, 1000);
        // With no time left either, nothing fits.
        let mut budget = TimeBudget::from_minutes(0.0, 1000);
        assert_eq!(budget.after_step(20, Duration::ZERO, 1000).planned, 20);
    }

    #[test]
    fn a_full_run_ends_within_its_budget() {
        // 1.5 s a step with 60 s: the run stops after 40 steps.
        let mut budget = TimeBudget::from_minutes(1.0, 1000);
        let mut planned = 1000;
        let mut step = 0;
        while step < planned {
            step += 1;
            planned = budget.after_step(step, secs(step as f64 * 1.5), planned).planned;
        }
        assert_eq!(step, 40);
        assert_eq!(budget.minutes(), 1.0);
    }
}
