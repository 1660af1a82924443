/**
 * TLS, mTLS and API keys against a live `serve --tls-cert --tls-key
 * --tls-client-ca` (SA_TLS_TARGET) whose allow-list names one API key
 * (AUTH_ALLOWED_IDENTITIES=apikey:node): the client certificate gets the
 * handshake, the key the mutations.
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  AuthenticationError,
  PermissionDeniedError,
  SessionAuthorityClient,
  UnavailableError,
  type ClientOptions,
} from "../src/index.js";
import { env, read, record, unique } from "./support.js";

const target = env("SA_TLS_TARGET");
const tls = { ca: read("SA_TLS_CA"), cert: read("SA_TLS_CERT"), key: read("SA_TLS_KEY") };
const apiKey = env("SA_API_KEY");

async function using<T>(options: ClientOptions, body: (client: SessionAuthorityClient) => Promise<T>): Promise<T> {
  const client = new SessionAuthorityClient(options);
  try {
    return await body(client);
  } finally {
    client.close();
  }
}

describe("TLS and API keys", () => {
  it("a lifecycle over mTLS with the API key", async () => {
    await using({ target, tls, apiKey }, async (client) => {
      const { token } = await client.create(unique("node-tls"));
      record(token);
      assert.equal((await client.validate(token)).valid, true);
      assert.equal((await client.invalidate({ token })).revoked, true);
      assert.equal((await client.validate(token)).valid, false);
      assert.equal((await client.health()).status, "healthy");
    });
  });

  it("the lifecycle methods over mTLS with the API key: the same transport", async () => {
    await using({ target, tls, apiKey }, async (client) => {
      const user = unique("node-tls");
      const keep = await client.create(user);
      const other = await client.create(user);
      for (const c of [keep, other]) record(c.token);
      const answers = await client.validateMany([keep.token, other.token]);
      assert.deepEqual(answers.map((a) => a.valid), [true, true]);
      assert.equal((await client.touch({ sessionId: keep.session.sessionId, extendBy: 600 })).session.userId, user);
      const listed: string[] = [];
      for await (const session of client.listSessions(user)) listed.push(session.sessionId);
      assert.deepEqual(listed.sort(), [keep.session.sessionId, other.session.sessionId].sort());
      const watch = await client.watchRevocations();
      const iterator = watch[Symbol.asyncIterator]();
      try {
        assert.equal((await iterator.next()).value?.kind, "start");
        const result = await client.invalidateUser(user, { exceptSessionId: keep.session.sessionId });
        assert.equal(result.revokedCount, 1);
        let event = (await iterator.next()).value;
        while (event !== undefined && (event.kind !== "revoked" || event.userId !== user)) {
          event = (await iterator.next()).value; // another test's revocation, or a newer kind
        }
        assert.equal(event?.sessionId, other.session.sessionId);
      } finally {
        watch.close();
      }
    });
  });

  it("without the key a mutation is refused: touch is PermissionDeniedError; a watch is a read", async () => {
    await using({ target, tls }, async (client) => {
      await assert.rejects(client.touch({ sessionId: "00000000-0000-4000-8000-000000000000" }), PermissionDeniedError);
      const watch = await client.watchRevocations();
      watch.close();
    });
  });

  it("a wrong API key is AuthenticationError, and the key is not in the message", async () => {
    const wrong = `wrong-${apiKey}`;
    await using({ target, tls, apiKey: wrong }, async (client) => {
      await assert.rejects(client.create(unique("node-tls")), (error: unknown) => {
        assert.ok(error instanceof AuthenticationError, String(error));
        assert.equal(error.code, "UNAUTHENTICATED");
        assert.ok(!error.message.includes(wrong));
        return true;
      });
    });
  });

  it("without the key: reads pass on the certificate, a mutation is PermissionDeniedError", async () => {
    await using({ target, tls }, async (client) => {
      assert.equal((await client.validate("not-a-token")).valid, false);
      await assert.rejects(client.create(unique("node-tls")), PermissionDeniedError);
    });
  });

  it("without a client certificate there is no handshake: UnavailableError", async () => {
    await using({ target, tls: { ca: tls.ca }, apiKey, retry: false }, async (client) => {
      await assert.rejects(client.health(), UnavailableError);
    });
  });

  it("a server certificate from another CA is refused", async () => {
    await using({ target, tls: { cert: tls.cert, key: tls.key }, apiKey, retry: false }, async (client) => {
      await assert.rejects(client.health(), (error: unknown) => {
        assert.ok(!(error instanceof AuthenticationError));
        assert.match(String(error), /certificate/i);
        return true;
      });
    });
  });

  it("an API key without TLS is refused before any call", () => {
    assert.throws(() => new SessionAuthorityClient({ target, apiKey }), /clear text/);
  });
});
