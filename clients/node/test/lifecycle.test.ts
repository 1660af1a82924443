/**
 * The lifecycle methods against the live plaintext `serve` (SA_TARGET):
 * validateMany, listSessions, invalidateUser's exceptSessionId, touch and
 * watchRevocations (resuming from its cursor through a proxy that resets the
 * connection), each with an INVALID_ARGUMENT case. Deadlines and retries of
 * these methods are in client.test.ts, beside the others'.
 */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, describe, it } from "node:test";
import {
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  SessionAuthorityClient,
  type RevocationEvent,
  type RevocationWatch,
} from "../src/index.js";
import { ResettingProxy, env, record, unique } from "./support.js";

const target = env("SA_TARGET");
const client = new SessionAuthorityClient({ target });
after(() => client.close());

async function created(user: string, ttl?: number): Promise<{ token: string; sessionId: string }> {
  const { token, session } = await client.create(user, ttl === undefined ? {} : { ttl });
  record(token);
  return { token, sessionId: session.sessionId };
}

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of items) out.push(item);
  return out;
}

/** The next event of `watch` that is not `kind` "start"... or any kind when `kinds` is empty. */
async function nextOf(iterator: AsyncIterator<RevocationEvent>, ...kinds: string[]): Promise<RevocationEvent> {
  for (;;) {
    const read = await iterator.next();
    assert.ok(!read.done, "the watch ended");
    if (kinds.length === 0 || kinds.includes(read.value.kind)) return read.value;
  }
}

describe("validateMany", () => {
  it("one answer per token, in order: valid, revoked, malformed, duplicate", async () => {
    const user = unique("node-many");
    const live = await created(user);
    const gone = await created(user);
    await client.invalidate({ token: gone.token });
    const answers = await client.validateMany([live.token, gone.token, "not-a-token", live.token]);
    assert.equal(answers.length, 4);
    const [a, b, c, d] = answers;
    assert.ok(a?.valid && a.session.sessionId === live.sessionId);
    assert.deepEqual(b && !b.valid && b.reason, "revoked");
    assert.deepEqual(c, { valid: false, reason: "unknown", source: "token_format" });
    assert.ok(d?.valid && d.session.userId === user);
    assert.deepEqual(await client.validateMany([]), []);
  });

  it("more than 100 tokens go in slices, the answers still in order", async () => {
    const live = await created(unique("node-many"));
    const tokens = Array.from({ length: 230 }, (_, i) => (i % 77 === 5 ? live.token : `not-a-token-${i}`));
    const answers = await client.validateMany(tokens);
    assert.equal(answers.length, 230);
    answers.forEach((answer, i) => assert.equal(answer.valid, i % 77 === 5, `answer ${i}`));
  });

  it("an over-long token fails its own entry, not the batch (no INVALID_ARGUMENT: the client slices at 100)", async () => {
    const live = await created(unique("node-many"));
    const answers = await client.validateMany([`sat_${"C".repeat(600)}`, live.token]);
    assert.deepEqual(answers[0], { valid: false, reason: "unknown", source: "token_format" });
    assert.equal(answers[1]?.valid, true);
  });
});

describe("listSessions", () => {
  it("live sessions oldest first, page by page; includeRevoked adds the revoked one", async () => {
    const user = unique("node-list");
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push((await created(user)).sessionId);
    const revoked = ids[1] ?? "";
    await client.invalidate({ sessionId: revoked });
    const live = ids.filter((id) => id !== revoked);

    const listed = await collect(client.listSessions(user, { pageSize: 2 }));
    assert.deepEqual(listed.map((s) => s.sessionId).sort(), [...live].sort());
    assert.ok(listed.every((s) => s.userId === user && s.revokedAt === undefined));
    const created_ = listed.map((s) => s.createdAt?.getTime() ?? NaN);
    assert.deepEqual(created_, [...created_].sort((x, y) => x - y)); // oldest first

    const pages = await collect(client.listSessions(user, { pageSize: 2 }).pages());
    assert.deepEqual(pages.map((p) => p.length), [2, 2]);

    const all = await collect(client.listSessions(user, { includeRevoked: true }));
    assert.equal(all.length, 5);
    const gone = all.find((s) => s.sessionId === revoked);
    assert.ok(gone?.revokedAt instanceof Date);
  });

  it("a user with no session: nothing", async () => {
    assert.deepEqual(await collect(client.listSessions(unique("node-nobody"))), []);
  });

  it("an empty user id: InvalidArgumentError naming user_id; a negative pageSize refused before any call", async () => {
    await assert.rejects(collect(client.listSessions("")), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError, String(error));
      assert.equal(error.method, "ListUserSessions");
      assert.match(error.message, /user_id/);
      return true;
    });
    assert.throws(() => client.listSessions("u", { pageSize: -1 }), RangeError);
  });
});

describe("invalidateUser with exceptSessionId", () => {
  it("revokes every other session of the user, keeps that one", async () => {
    const user = unique("node-except");
    const keep = await created(user);
    const others = [await created(user), await created(user)];
    const result = await client.invalidateUser(user, { exceptSessionId: keep.sessionId });
    assert.equal(result.revokedCount, 2);
    assert.equal((await client.validate(keep.token)).valid, true);
    for (const other of others) assert.equal((await client.validate(other.token)).valid, false);
  });

  it("another user's session: InvalidArgumentError naming except_session_id, nothing revoked", async () => {
    const user = unique("node-except");
    const mine = await created(user);
    const theirs = await created(unique("node-except"));
    await assert.rejects(client.invalidateUser(user, { exceptSessionId: theirs.sessionId }), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError, String(error));
      assert.match(error.message, /except_session_id/);
      return true;
    });
    assert.equal((await client.validate(mine.token)).valid, true);
  });
});

describe("touch", () => {
  it("by token and by session id: the expiry moves forward", async () => {
    const { token, sessionId } = await created(unique("node-touch"), 60);
    const before = await client.validate(token); // cached by the server from here
    assert.ok(before.valid);
    const first = await client.touch({ token, extendBy: 3600, writeThrough: true });
    assert.equal(first.session.sessionId, sessionId);
    assert.equal(first.written, true);
    assert.ok((first.session.expiresAt?.getTime() ?? 0) > (before.session.expiresAt?.getTime() ?? Infinity));
    const second = await client.touch({ sessionId });
    assert.equal(second.session.sessionId, sessionId);
    assert.ok((second.session.expiresAt?.getTime() ?? 0) >= (first.session.expiresAt?.getTime() ?? Infinity));
  });

  it("by default a cached session is answered at once, its write behind the answer", async () => {
    const { token } = await created(unique("node-touch"), 60);
    const before = await client.validate(token);
    assert.ok(before.valid);
    const answer = await client.touch({ token, extendBy: 3600 });
    assert.equal(answer.written, false);
    assert.equal(answer.session.expiresAt?.getTime(), before.session.expiresAt?.getTime());
  });

  it("unknown: NotFoundError; revoked: FailedPreconditionError, and it stays revoked", async () => {
    await assert.rejects(client.touch({ sessionId: randomUUID() }), NotFoundError);
    const { token } = await created(unique("node-touch"));
    await client.invalidate({ token });
    await assert.rejects(client.touch({ token }), (error: unknown) => {
      assert.ok(error instanceof FailedPreconditionError, String(error));
      assert.ok(!error.message.includes(token));
      return true;
    });
    assert.equal((await client.validate(token)).valid, false);
  });

  it("extendBy 0: InvalidArgumentError naming extend_by; negative refused before any call", async () => {
    const { sessionId } = await created(unique("node-touch"));
    await assert.rejects(client.touch({ sessionId, extendBy: 0 }), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError, String(error));
      assert.equal(error.method, "TouchSession");
      assert.match(error.message, /extend_by/);
      return true;
    });
    await assert.rejects(client.touch({ sessionId, extendBy: -1 }), RangeError);
  });
});

describe("watchRevocations", () => {
  it("START first, then each revocation; resumes after a cursor with none lost or repeated", async () => {
    const user = unique("node-watch");
    const a = await created(user);
    const b = await created(user);
    const watch = await client.watchRevocations();
    const iterator = watch[Symbol.asyncIterator]();
    try {
      const start = await nextOf(iterator);
      assert.equal(start.kind, "start");
      assert.notEqual(start.cursor, "");
      assert.equal(watch.cursor, start.cursor);
      await client.invalidate({ token: a.token });
      const revoked = await nextOf(iterator, "revoked");
      assert.equal(revoked.sessionId, a.sessionId);
      assert.equal(revoked.userId, user);
      assert.equal(revoked.reason, "explicit");
      assert.ok(revoked.revokedAt instanceof Date);
      assert.equal(watch.cursor, revoked.cursor);
    } finally {
      watch.close();
    }
    assert.equal((await iterator.next()).done, true); // closed: the iteration ends quietly

    await client.invalidateUser(user); // b, while nobody watches
    const resumed = await client.watchRevocations({ after: watch.cursor });
    const again = resumed[Symbol.asyncIterator]();
    try {
      const start = await nextOf(again);
      assert.equal(start.kind, "start");
      assert.equal(start.cursor, watch.cursor);
      const next = await nextOf(again, "revoked");
      assert.equal(next.sessionId, b.sessionId); // not a again
      assert.equal(next.reason, "user_wide");
    } finally {
      resumed.close();
    }
  });

  it("the connection reset under a watch: it resumes from its cursor by itself", async () => {
    const proxy = await ResettingProxy.start(target);
    const retries: string[] = [];
    const viaProxy = new SessionAuthorityClient({ target: proxy.target, onRetry: (e) => retries.push(e.method) });
    let watch: RevocationWatch | undefined;
    try {
      const user = unique("node-watch-cut");
      const a = await created(user);
      const b = await created(user);
      watch = await viaProxy.watchRevocations();
      const iterator = watch[Symbol.asyncIterator]();
      assert.equal((await nextOf(iterator)).kind, "start");
      await client.invalidate({ token: a.token });
      const first = await nextOf(iterator, "revoked");
      assert.equal(first.sessionId, a.sessionId);

      proxy.resetNext(1); // the open connection and the next attempt
      await client.invalidate({ token: b.token }); // while the watch is down
      const restart = await nextOf(iterator);
      assert.equal(restart.kind, "start");
      assert.equal(restart.cursor, first.cursor); // resumed after the last event received
      const second = await nextOf(iterator, "revoked");
      assert.equal(second.sessionId, b.sessionId);
      assert.ok(retries.length >= 1 && retries.every((m) => m === "WatchRevocations"), String(retries));
      assert.ok(proxy.connections >= 3, String(proxy.connections));
    } finally {
      watch?.close();
      viaProxy.close();
      await proxy.close();
    }
  });

  it("resume: false ends the iteration with UnavailableError when the connection is lost", async () => {
    const proxy = await ResettingProxy.start(target);
    const viaProxy = new SessionAuthorityClient({ target: proxy.target });
    try {
      const watch = await viaProxy.watchRevocations({ resume: false });
      const iterator = watch[Symbol.asyncIterator]();
      assert.equal((await nextOf(iterator)).kind, "start");
      proxy.resetNext(1);
      await assert.rejects(iterator.next(), (error: unknown) => {
        assert.equal((error as { code?: string }).code, "UNAVAILABLE", String(error));
        return true;
      });
      watch.close();
    } finally {
      viaProxy.close();
      await proxy.close();
    }
  });

  it("a made-up cursor: InvalidArgumentError naming after, when the watch opens", async () => {
    await assert.rejects(client.watchRevocations({ after: "not-a-cursor" }), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError, String(error));
      assert.equal(error.method, "WatchRevocations");
      assert.match(error.message, /after/);
      return true;
    });
  });
});
