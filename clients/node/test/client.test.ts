/**
 * Every method against a live plaintext `serve` (SA_TARGET), the error
 * mapping, deadlines against the real server frozen with SIGSTOP, and the
 * retries of idempotent calls through a proxy that resets connections.
 */

import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import {
  DeadlineExceededError,
  InvalidArgumentError,
  SessionAuthorityClient,
  SessionAuthorityError,
  UnavailableError,
} from "../src/index.js";
import { Code, ConnectError } from "@connectrpc/connect";
import { fromConnectError } from "../src/errors.js";
import { ResettingProxy, env, record, unique } from "./support.js";

const target = env("SA_TARGET");
const client = new SessionAuthorityClient({ target });
after(() => client.close());

describe("every method", () => {
  it("create, then validate: valid, with the session", async () => {
    const user = unique("node-user");
    const created = await client.create(user, { ttl: 600, metadata: { device: "node-test" } });
    record(created.token);
    assert.match(created.token, /^sat_[A-Za-z0-9_-]{48}$/);
    assert.equal(created.session.userId, user);
    assert.deepEqual(created.session.metadata, { device: "node-test" });
    const { createdAt, expiresAt } = created.session;
    assert.ok(createdAt instanceof Date && expiresAt instanceof Date);
    assert.equal(expiresAt.getTime() - createdAt.getTime(), 600_000);

    const answer = await client.validate(created.token);
    assert.equal(answer.valid, true);
    assert.ok(answer.valid);
    assert.equal(answer.session.sessionId, created.session.sessionId);
    assert.equal(answer.session.userId, user);
    assert.deepEqual(answer.session.metadata, { device: "node-test" });
    assert.ok(answer.source === "cache" || answer.source === "database", answer.source);
  });

  it("an unknown or malformed token is a normal answer, not an error", async () => {
    const answer = await client.validate("not-a-token");
    assert.deepEqual(answer, { valid: false, reason: "unknown", source: "token_format" });
  });

  it("invalidate by token: revoked once, then idempotent; validate says revoked", async () => {
    const { token } = await client.create(unique("node-user"));
    record(token);
    assert.deepEqual(await client.invalidate({ token }), { revoked: true, cachePurged: true, propagated: true });
    const revoked = await client.validate(token);
    assert.equal(revoked.valid, false);
    assert.equal(!revoked.valid && revoked.reason, "revoked");
    assert.equal((await client.invalidate({ token })).revoked, false);
  });

  it("invalidate by session id", async () => {
    const { token, session } = await client.create(unique("node-user"));
    record(token);
    assert.equal((await client.invalidate({ sessionId: session.sessionId })).revoked, true);
    const answer = await client.validate(token);
    assert.equal(answer.valid, false);
    assert.equal(!answer.valid && answer.reason, "revoked");
  });

  it("invalidateUser revokes every session of the user and no other", async () => {
    const user = unique("node-user");
    const mine = [await client.create(user), await client.create(user)];
    const other = await client.create(unique("node-user"));
    for (const c of [...mine, other]) record(c.token);
    const result = await client.invalidateUser(user);
    assert.deepEqual(result, { revokedCount: 2, cachePurged: true, propagated: true });
    for (const c of mine) assert.equal((await client.validate(c.token)).valid, false);
    assert.equal((await client.validate(other.token)).valid, true);
  });

  it("health", async () => {
    const health = await client.health();
    assert.equal(health.status, "healthy");
    assert.deepEqual(health.errors, []);
    assert.ok(health.timestamp instanceof Date);
    assert.equal(health.document.postgres?.connected, true);
  });
});

describe("errors", () => {
  it("INVALID_ARGUMENT is InvalidArgumentError, naming the field", async () => {
    await assert.rejects(client.create(""), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError);
      assert.ok(error instanceof SessionAuthorityError);
      assert.equal(error.code, "INVALID_ARGUMENT");
      assert.equal(error.method, "CreateSession");
      assert.match(error.message, /user_id/);
      return true;
    });
  });

  it("never a token in an error message", async () => {
    const token = `sat_${"A".repeat(600)}`; // over the 512-character limit
    await assert.rejects(client.validate(token), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError);
      assert.match(error.message, /token/);
      assert.ok(!error.message.includes("AAAAAAAA"), error.message);
      assert.ok(!String(error.stack).includes("AAAAAAAA"));
      return true;
    });
  });
});

describe("redaction, a second line of defence", () => {
  it("a token or the API key in a message from below is redacted", () => {
    const token = `sat_${"b".repeat(48)}`;
    const error = fromConnectError(
      new ConnectError(`upstream said ${token} and key-123 and sat_short`, Code.Unavailable),
      "ValidateSession",
      ["key-123"],
    );
    assert.ok(error instanceof UnavailableError);
    assert.equal(error.message, "ValidateSession: UNAVAILABLE: upstream said [redacted] and [redacted] and [redacted]");
  });
});

describe("deadlines: the server frozen (SIGSTOP)", () => {
  const pid = Number(env("SA_SERVER_PID"));

  it("every method ends DEADLINE_EXCEEDED within its deadline, then works again", async () => {
    const timeouts = {
      validate: 300,
      create: 300,
      invalidate: 300,
      invalidateUser: 300,
      health: 300,
      validateMany: 300,
      listSessions: 300,
      touch: 300,
      watchStart: 300,
    };
    const frozen = new SessionAuthorityClient({ target, timeouts });
    const { token } = await frozen.create(unique("node-user")); // connected before the freeze
    record(token);
    process.kill(pid, "SIGSTOP");
    try {
      const calls: Array<[string, () => Promise<unknown>]> = [
        ["ValidateSession", () => frozen.validate(token)],
        ["CreateSession", () => frozen.create(unique("node-user"))],
        ["Invalidate", () => frozen.invalidate({ token })],
        ["InvalidateUser", () => frozen.invalidateUser(unique("node-user"))],
        ["Health", () => frozen.health()],
        ["ValidateSessions", () => frozen.validateMany([token, "not-a-token"])],
        ["ListUserSessions", async () => {
          for await (const session of frozen.listSessions(unique("node-user"))) void session;
        }],
        ["TouchSession", () => frozen.touch({ token })],
        ["WatchRevocations", () => frozen.watchRevocations()],
      ];
      for (const [method, call] of calls) {
        await assert.rejects(call(), (error: unknown) => {
          assert.ok(error instanceof DeadlineExceededError, String(error));
          assert.equal(error.method, method);
          assert.ok(!error.message.includes(token));
          return true;
        });
      }
    } finally {
      process.kill(pid, "SIGCONT");
    }
    // Invalidate never reached the frozen server's handler... or did, on thaw: either way valid or revoked.
    const after = await frozen.validate(token, { timeoutMs: 10_000 });
    assert.ok(after.valid || after.reason === "revoked");
    frozen.close();
  });
});

describe("retries of idempotent calls on UNAVAILABLE (connections reset, as in a restart)", () => {
  const timeouts = {
    validate: 10_000,
    create: 10_000,
    invalidate: 10_000,
    invalidateUser: 10_000,
    health: 10_000,
    validateMany: 10_000,
    listSessions: 10_000,
    touch: 10_000,
  };

  it("each idempotent method: the first two connections reset, two retries, then the answer", async () => {
    const { token } = await client.create(unique("node-user"));
    record(token);
    const calls: Array<[string, (c: SessionAuthorityClient) => Promise<unknown>]> = [
      ["ValidateSession", (c) => c.validate(token)],
      ["Health", (c) => c.health()],
      ["InvalidateUser", (c) => c.invalidateUser(unique("node-user"))],
      ["ValidateSessions", (c) => c.validateMany([token])],
      ["ListUserSessions", async (c) => {
        for await (const session of c.listSessions(unique("node-user"))) void session;
      }],
      ["TouchSession", (c) => c.touch({ token })],
      ["Invalidate", (c) => c.invalidate({ token })],
    ];
    for (const [method, call] of calls) {
      const proxy = await ResettingProxy.start(target);
      const retries: string[] = [];
      const fresh = new SessionAuthorityClient({
        target: proxy.target,
        timeouts,
        onRetry: (event) => retries.push(`${event.method}#${event.attempt}`),
      });
      try {
        proxy.resetNext(2);
        await call(fresh);
        assert.deepEqual(retries, [`${method}#1`, `${method}#2`]);
        assert.equal(proxy.connections, 3);
      } finally {
        fresh.close();
        await proxy.close();
      }
    }
    assert.equal((await client.validate(token)).valid, false); // the retried Invalidate reached the server
  });

  it("mid-use: the established connection reset (a restart), validate still answers", async () => {
    const proxy = await ResettingProxy.start(target);
    const retries: number[] = [];
    const viaProxy = new SessionAuthorityClient({ target: proxy.target, timeouts, onRetry: (e) => retries.push(e.attempt) });
    try {
      const { token } = await client.create(unique("node-user"));
      record(token);
      assert.equal((await viaProxy.validate(token)).valid, true);
      proxy.resetNext(1); // the open connection and the next one
      assert.equal((await viaProxy.validate(token)).valid, true);
      // One retry when the client saw the reset before sending, two when it sent on the dying connection.
      assert.ok(retries.length === 1 || retries.length === 2, String(retries));
    } finally {
      viaProxy.close();
      await proxy.close();
    }
  });

  it("without retries a reset is UnavailableError", async () => {
    const proxy = await ResettingProxy.start(target);
    const noRetry = new SessionAuthorityClient({ target: proxy.target, timeouts, retry: false });
    try {
      proxy.resetNext(1);
      await assert.rejects(noRetry.validate("not-a-token"), UnavailableError);
      assert.equal(proxy.connections, 1);
      assert.equal((await noRetry.validate("not-a-token")).valid, false); // the next call reconnects
    } finally {
      noRetry.close();
      await proxy.close();
    }
  });

  it("CreateSession is never retried", async () => {
    const proxy = await ResettingProxy.start(target);
    const retries: string[] = [];
    const fresh = new SessionAuthorityClient({ target: proxy.target, timeouts, onRetry: (e) => retries.push(e.method) });
    try {
      proxy.resetNext(1);
      await assert.rejects(fresh.create(unique("node-user")), UnavailableError);
      assert.deepEqual(retries, []);
      assert.equal(proxy.connections, 1);
    } finally {
      fresh.close();
      await proxy.close();
    }
  });

  it("retries stop at maxAttempts", async () => {
    const proxy = await ResettingProxy.start(target);
    const retries: number[] = [];
    const fresh = new SessionAuthorityClient({
      target: proxy.target,
      timeouts,
      retry: { maxAttempts: 3 },
      onRetry: (event) => retries.push(event.attempt),
    });
    try {
      proxy.resetNext(5);
      await assert.rejects(fresh.health(), UnavailableError);
      assert.deepEqual(retries, [1, 2]);
      assert.equal(proxy.connections, 3);
    } finally {
      fresh.close();
      await proxy.close();
    }
  });
});
