// The Socket.IO connection: events in, requests out. A request resolves with the server's acknowledgement
// or rejects with a ServerError; it is never queued while offline, because a change sent later could be
// based on a revision that has moved on by then.

import { io } from '../vendor/socket.io-client-4.8.4/socket.io.esm.min.js';
import { ServerError } from './api.js';

const ANSWER_TIMEOUT_MS = 30000;

export class Connection {
  constructor() {
    // Same origin; the login cookie goes along with the handshake. The server is usually on this machine
    // or the local network, so retrying often is cheap and brings the page back soon after a restart.
    this.socket = io({ autoConnect: false, reconnectionDelay: 500, reconnectionDelayMax: 2000 });
    this.socket.on('disconnect', (reason) => {
      // The server closing the connection on purpose stops the client's own retries; a server that
      // restarts does this, and the page should still come back by itself.
      if (reason === 'io server disconnect' && this.wanted) this.socket.connect();
    });
    this.wanted = false;
  }

  get connected() {
    return this.socket.connected;
  }

  on(event, handler) {
    this.socket.on(event, handler);
  }

  open() {
    this.wanted = true;
    this.socket.connect();
  }

  close() {
    this.wanted = false;
    this.socket.disconnect();
  }

  request(event, data) {
    if (!this.socket.connected) {
      return Promise.reject(new ServerError('offline', 'Not connected to the server; reconnecting…'));
    }
    return new Promise((resolve, reject) => {
      this.socket.timeout(ANSWER_TIMEOUT_MS).emit(event, data, (timedOut, answer) => {
        if (timedOut) reject(new ServerError('timeout', 'The server did not answer in time; try again.'));
        else if (answer && answer.ok) resolve(answer);
        else {
          const error = (answer && answer.error) || {};
          reject(new ServerError(error.code || 'internal', error.message || 'The server refused that.'));
        }
      });
    });
  }
}
