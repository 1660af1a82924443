/**
 * What the tests get from the Python harness (tests/e2e/test_node_client.py),
 * which starts the servers: targets, the plaintext server's pid (to freeze
 * it), TLS material and the API key. And a TCP proxy that plays a server
 * restart at the network level: connections reset, then accepted again.
 */

import { appendFileSync, readFileSync } from "node:fs";
import * as net from "node:net";

export function env(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") {
    throw new Error(`${name} is not set: run these tests through tests/e2e/test_node_client.py (make test)`);
  }
  return value;
}

export const read = (name: string): string => readFileSync(env(name), "utf8");

/** Records a token CreateSession returned, so the Python side can prove no log holds it. */
export function record(token: string): string {
  const path = process.env["SA_TOKEN_LOG"];
  if (path !== undefined && path !== "") appendFileSync(path, `${token}\n`);
  return token;
}

export const unique = (prefix: string): string => `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;

/**
 * A TCP proxy to `upstream`. `resetNext(n)` resets every open connection and
 * the next `n` new ones (as a restarting server's clients see it); then it
 * forwards again. `connections` counts accepted connections.
 */
export class ResettingProxy {
  connections = 0;
  resetsLeft = 0;
  private readonly server: net.Server;
  private readonly open = new Set<net.Socket>();

  private constructor(private readonly upstream: { host: string; port: number }) {
    this.server = net.createServer((client) => this.accept(client));
  }

  static async start(target: string): Promise<ResettingProxy> {
    const at = target.lastIndexOf(":");
    const proxy = new ResettingProxy({ host: target.slice(0, at), port: Number(target.slice(at + 1)) });
    await new Promise<void>((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  get target(): string {
    const address = this.server.address() as net.AddressInfo;
    return `127.0.0.1:${address.port}`;
  }

  resetNext(n: number): void {
    this.resetsLeft = n;
    for (const socket of this.open) socket.resetAndDestroy();
    this.open.clear();
  }

  async close(): Promise<void> {
    for (const socket of this.open) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: net.Socket): void {
    this.connections += 1;
    if (this.resetsLeft > 0) {
      this.resetsLeft -= 1;
      client.resetAndDestroy();
      return;
    }
    const server = net.connect(this.upstream);
    this.open.add(client);
    const drop = (): void => {
      this.open.delete(client);
      client.destroy();
      server.destroy();
    };
    client.on("error", drop).on("close", drop);
    server.on("error", drop).on("close", drop);
    client.pipe(server).pipe(client);
  }
}
