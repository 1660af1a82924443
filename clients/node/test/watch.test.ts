/**
 * RevocationWatch on an in-process Connect router (no server): event kinds
 * this client does not know pass through, and what a resumption sends. The
 * live stream is tested in lifecycle.test.ts; these cover what the server
 * cannot be made to send (a kind newer than the generated code) and count
 * the reopenings exactly.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import {
  RevocationEventKind,
  SessionAuthority,
} from "../src/gen/session_authority/v1/session_authority_pb.js";
import { DEFAULT_RETRY, FailedPreconditionError, RevocationWatch, type RevocationEvent } from "../src/index.js";

type Script = (after: string) => AsyncGenerator<{ kind: number; cursor: string; sessionId?: string }>;

function opener(script: Script): { open: (after: string, signal: AbortSignal) => AsyncIterable<never>; calls: string[] } {
  const calls: string[] = [];
  const transport = createRouterTransport(({ service }) => {
    service(SessionAuthority, {
      watchRevocations(request) {
        calls.push(request.after);
        return script(request.after);
      },
    });
  });
  const client = createClient(SessionAuthority, transport);
  const open = (after: string, signal: AbortSignal): AsyncIterable<never> =>
    client.watchRevocations({ after }, { signal }) as AsyncIterable<never>;
  return { open, calls };
}

const settings = { startTimeoutMs: 5000, resume: { ...DEFAULT_RETRY, initialBackoffMs: 1 }, secrets: [] };

async function take(watch: RevocationWatch, n: number): Promise<RevocationEvent[]> {
  const out: RevocationEvent[] = [];
  for await (const event of watch) {
    out.push(event);
    if (out.length === n) break;
  }
  return out;
}

describe("RevocationWatch", () => {
  it("a kind newer than this client passes through, named 'unknown' with its number", async () => {
    const { open } = opener(async function* () {
      yield { kind: RevocationEventKind.START, cursor: "c0" };
      yield { kind: 7, cursor: "c1" };
      yield { kind: RevocationEventKind.REVOKED, cursor: "c2", sessionId: "s-1" };
    });
    const watch = await RevocationWatch.start(open, settings, "");
    const events = await take(watch, 3);
    watch.close();
    assert.deepEqual(
      events.map((e) => [e.kind, e.kindNumber, e.cursor, e.sessionId]),
      [
        ["start", 1, "c0", ""],
        ["unknown", 7, "c1", ""],
        ["revoked", 2, "c2", "s-1"],
      ],
    );
    assert.equal(watch.cursor, "c2");
  });

  it("UNAVAILABLE mid-stream: reopened after the last cursor, its START yielded, then the rest", async () => {
    let opened = 0;
    const { open, calls } = opener(async function* (after) {
      opened += 1;
      if (opened === 2) throw new ConnectError("still draining", Code.Unavailable); // before its START
      yield { kind: RevocationEventKind.START, cursor: after || "c0" };
      if (opened === 1) {
        yield { kind: RevocationEventKind.REVOKED, cursor: "c1", sessionId: "s-1" };
        throw new ConnectError("draining", Code.Unavailable);
      }
      yield { kind: RevocationEventKind.REVOKED, cursor: "c2", sessionId: "s-2" };
    });
    const retries: number[] = [];
    const watch = await RevocationWatch.start(open, { ...settings, onRetry: (e) => retries.push(e.attempt) }, "");
    const events = await take(watch, 4);
    watch.close();
    assert.deepEqual(events.map((e) => `${e.kind}:${e.cursor}`), ["start:c0", "revoked:c1", "start:c1", "revoked:c2"]);
    assert.deepEqual(calls, ["", "c1", "c1"]);
    assert.deepEqual(retries, [1, 2]); // the second reopening failed before its START
  });

  it("FAILED_PRECONDITION (a cursor too old) is never resumed: the caller must start over", async () => {
    const { open, calls } = opener(async function* () {
      yield { kind: RevocationEventKind.START, cursor: "c0" };
      throw new ConnectError("cursor expired", Code.FailedPrecondition);
    });
    const watch = await RevocationWatch.start(open, settings, "");
    const iterator = watch[Symbol.asyncIterator]();
    assert.equal((await iterator.next()).value?.kind, "start");
    await assert.rejects(iterator.next(), FailedPreconditionError);
    assert.deepEqual(calls, [""]);
  });

  it("resumption gives up after maxAttempts", async () => {
    const { open, calls } = opener(async function* (after) {
      if (after !== "") throw new ConnectError("gone", Code.Unavailable);
      yield { kind: RevocationEventKind.START, cursor: "c0" };
      throw new ConnectError("gone", Code.Unavailable);
    });
    const watch = await RevocationWatch.start(open, { ...settings, resume: { ...settings.resume, maxAttempts: 3 } }, "");
    const iterator = watch[Symbol.asyncIterator]();
    assert.equal((await iterator.next()).value?.kind, "start");
    await assert.rejects(iterator.next(), (error: unknown) => (error as { code?: string }).code === "UNAVAILABLE");
    assert.deepEqual(calls, ["", "c0", "c0"]);
  });
});
