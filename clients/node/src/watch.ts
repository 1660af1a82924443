/**
 * `watchRevocations`' answer: a live WatchRevocations stream as an async
 * iterable of typed events, which resumes itself from its last cursor.
 *
 * - Opening waits for the START event (the first of every stream) under the
 *   `watchStart` deadline, so a refused or unreachable watch fails at once;
 *   after it the stream has no deadline (it runs until closed; keepalive
 *   PINGs notice a dead connection).
 * - `cursor` is the last cursor received, START's included.
 * - When the stream ends UNAVAILABLE (a draining server, a lost connection)
 *   and `resume` is on (the default), the watch opens a new stream with
 *   `after: cursor`, on any replica, with the retry policy's backoff and
 *   attempts; the new stream's START event is yielded (its cursor is the one
 *   resumed after), then every revocation after it: none lost, none twice.
 *   Any other error ends the iteration with it: FAILED_PRECONDITION means the
 *   cursor is too old (drop everything cached, watch again from now).
 * - Kinds this client does not know (added to the proto later) are yielded
 *   like any other: a consumer ignores what it does not know.
 * - `close()` (or the caller's signal) cancels the stream; the iteration then
 *   ends quietly.
 */

import type { RevocationEvent as RevocationEventMessage } from "./gen/session_authority/v1/session_authority_pb.js";
import { DeadlineExceededError, SessionAuthorityError, fromConnectError } from "./errors.js";
import { toRevocationEvent, type RevocationEvent } from "./results.js";
import { asConnectionLoss, sleep, type RetryListener, type RetryPolicy } from "./transport.js";

const METHOD = "WatchRevocations";

/** Opens one stream after `after`, cancelled by `signal`. */
export type OpenStream = (after: string, signal: AbortSignal) => AsyncIterable<RevocationEventMessage>;

export interface WatchSettings {
  readonly startTimeoutMs: number;
  /** How resumption retries; undefined: no resumption. */
  readonly resume: RetryPolicy | undefined;
  readonly onRetry?: RetryListener | undefined;
  /** Secrets (the API key) never shown in an error. */
  readonly secrets: readonly string[];
}

interface Stream {
  readonly iterator: AsyncIterator<RevocationEventMessage>;
  readonly abort: AbortController;
  /** Cancels the stream and forgets it (the watch's close no longer needs to reach it). */
  readonly end: () => void;
}

export class RevocationWatch implements AsyncIterable<RevocationEvent> {
  /** The last cursor received: pass it as `after` to resume after it (any replica). */
  cursor: string;
  private stream: Stream | undefined;
  private pending: RevocationEvent | undefined;
  private closed = false;
  private readonly closing = new AbortController();

  private constructor(
    private readonly open: OpenStream,
    private readonly settings: WatchSettings,
    after: string,
  ) {
    this.cursor = after;
  }

  /** A watch whose START event has arrived. Throws a `SessionAuthorityError` when it cannot start. */
  static async start(
    open: OpenStream,
    settings: WatchSettings,
    after: string,
    signal?: AbortSignal,
  ): Promise<RevocationWatch> {
    const watch = new RevocationWatch(open, settings, after);
    if (signal !== undefined) {
      if (signal.aborted) watch.close();
      else signal.addEventListener("abort", () => watch.close(), { once: true });
    }
    await watch.connect();
    return watch;
  }

  /** Cancels the stream; an iteration in progress ends. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.pending = undefined;
    this.closing.abort();
  }

  [Symbol.asyncIterator](): AsyncIterator<RevocationEvent> {
    return { next: () => this.next() };
  }

  private async next(): Promise<IteratorResult<RevocationEvent>> {
    for (;;) {
      if (this.pending !== undefined) {
        const value = this.pending;
        this.pending = undefined;
        return { value, done: false };
      }
      const stream = this.stream;
      if (this.closed || stream === undefined) return { value: undefined, done: true };
      let failure: SessionAuthorityError;
      try {
        const read = await stream.iterator.next();
        if (read.done) {
          this.stream = undefined; // ended by the server without an error: the end
          stream.end();
          return { value: undefined, done: true };
        }
        return { value: this.received(read.value), done: false };
      } catch (error) {
        if (this.closed) return { value: undefined, done: true };
        failure = this.mapped(error, stream.abort.signal.aborted);
      }
      this.stream = undefined;
      stream.end();
      if (this.settings.resume === undefined || failure.code !== "UNAVAILABLE") throw failure;
      await this.resume(this.settings.resume, failure); // sets pending to the new START
    }
  }

  /** Reopens after `cursor` with backoff; throws the last failure when the attempts are spent. */
  private async resume(policy: RetryPolicy, failure: SessionAuthorityError): Promise<void> {
    let backoff = policy.initialBackoffMs;
    let last = failure;
    for (let attempt = 1; attempt < policy.maxAttempts; attempt++) {
      this.settings.onRetry?.({ method: METHOD, attempt, code: last.code });
      try {
        await sleep(Math.random() * backoff, this.closing.signal);
      } catch {
        return; // closed while waiting: the next read ends the iteration
      }
      backoff = Math.min(backoff * policy.backoffMultiplier, policy.maxBackoffMs);
      try {
        await this.connect();
        return;
      } catch (error) {
        if (this.closed) return;
        if (!(error instanceof SessionAuthorityError) || error.code !== "UNAVAILABLE") throw error;
        last = error;
      }
    }
    throw last;
  }

  /** Opens a stream after `cursor` and reads its START event (into `pending`) within the deadline. */
  private async connect(): Promise<void> {
    const abort = new AbortController();
    const onClose = (): void => abort.abort();
    const end = (): void => {
      abort.abort();
      this.closing.signal.removeEventListener("abort", onClose);
    };
    this.closing.signal.addEventListener("abort", onClose, { once: true });
    if (this.closed) abort.abort();
    const iterator = this.open(this.cursor, abort.signal)[Symbol.asyncIterator]();
    let expired = false;
    const timer = setTimeout(() => {
      expired = true;
      abort.abort();
    }, this.settings.startTimeoutMs);
    try {
      const first = await iterator.next();
      if (first.done) {
        throw new SessionAuthorityError(`${METHOD}: UNKNOWN: the watch ended before its START event`, "UNKNOWN", METHOD);
      }
      this.stream = { iterator, abort, end };
      this.pending = this.received(first.value);
    } catch (error) {
      end();
      if (expired) {
        const ms = this.settings.startTimeoutMs;
        throw new DeadlineExceededError(`${METHOD}: DEADLINE_EXCEEDED: no START event within ${ms} ms`, "DEADLINE_EXCEEDED", METHOD);
      }
      throw this.mapped(error, this.closed);
    } finally {
      clearTimeout(timer);
    }
  }

  private received(message: RevocationEventMessage): RevocationEvent {
    const event = toRevocationEvent(message);
    if (event.cursor !== "") this.cursor = event.cursor;
    return event;
  }

  private mapped(error: unknown, abortedHere: boolean): SessionAuthorityError {
    if (error instanceof SessionAuthorityError) return error;
    return fromConnectError(asConnectionLoss(error, abortedHere), METHOD, this.settings.secrets);
  }
}
