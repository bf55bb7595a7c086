// The dashboard's numbers: the feed's records kept for the last minutes, and what each chart
// plots at one tick (quantiles of the replies in a trailing window, the newest summary per
// replica).

export interface ReplyRecord {
  type: "reply";
  replica: string;
  status: "completed" | "cancelled" | "failed";
  queue_ms: number;
  first_revision_ms: number;
  total_ms: number;
  steps: number;
  tokens_per_step: number;
  prompt_tokens: number;
  cached_prompt_tokens: number;
  completion_tokens: number;
  at: number;
}

export interface SummaryRecord {
  type: "summary";
  replica: string;
  running: number;
  waiting: number;
  connections: number;
  errors: Record<string, number>;
  at: number;
}

export type StatsRecord = ReplyRecord | SummaryRecord;

/** The q-quantile (0..1) of `values` by nearest rank; null when empty. */
export function quantile(values: number[], q: number): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[rank];
}

export function mean(values: number[]): number | null {
  return values.length === 0 ? null : values.reduce((a, b) => a + b, 0) / values.length;
}

/** Records of the last `keepMs`, and the replicas seen. */
export class Window {
  replies: ReplyRecord[] = [];
  summaries = new Map<string, SummaryRecord[]>();

  constructor(readonly keepMs: number) {}

  add(r: StatsRecord, now = Date.now()): void {
    if (r.type === "reply") {
      this.replies.push(r);
    } else if (r.type === "summary") {
      const list = this.summaries.get(r.replica) ?? [];
      list.push(r);
      this.summaries.set(r.replica, list);
    }
    this.prune(now);
  }

  prune(now = Date.now()): void {
    const from = now - this.keepMs;
    while (this.replies.length && this.replies[0].at < from) this.replies.shift();
    for (const [k, list] of this.summaries) {
      while (list.length && list[0].at < from) list.shift();
      if (!list.length) this.summaries.delete(k);
    }
  }

  replicas(): string[] {
    const names = new Set<string>(this.summaries.keys());
    for (const r of this.replies) names.add(r.replica);
    return [...names].sort();
  }

  /** Replies that ended in (now - spanMs, now], of `replica` (all when null). */
  recent(now: number, spanMs: number, replica: string | null): ReplyRecord[] {
    return this.replies.filter((r) => r.at > now - spanMs && r.at <= now && (replica === null || r.replica === replica));
  }

  /** The newest summary of `replica` no older than `maxAgeMs`. */
  latest(replica: string, now: number, maxAgeMs: number): SummaryRecord | null {
    const list = this.summaries.get(replica);
    const last = list?.[list.length - 1];
    return last && now - last.at <= maxAgeMs ? last : null;
  }
}
