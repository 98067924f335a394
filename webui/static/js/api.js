// JSON over HTTP to the chat server. Every failure becomes a ServerError with the server's stable code and
// its one-sentence message, so callers show one kind of error whatever went wrong.

export class ServerError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

const listeners = { loginRequired: [] };

/** Called whenever the server says the login is missing or has expired. */
export function onLoginRequired(callback) {
  listeners.loginRequired.push(callback);
}

export async function api(method, path, body) {
  const options = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = typeof body === 'string' ? body : JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch {
    throw new ServerError('offline', 'Could not reach the server; check that it is running.');
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // A proxy's HTML error page or an empty body: described below by the status alone.
  }
  if (!response.ok) {
    const error = data && data.error;
    if (error && error.code === 'login_required') listeners.loginRequired.forEach((callback) => callback());
    throw error && error.message
      ? new ServerError(error.code, error.message, response.status)
      : new ServerError('http', `The server answered ${response.status} ${response.statusText}.`, response.status);
  }
  return data;
}

export const get = (path) => api('GET', path);
export const post = (path, body = {}) => api('POST', path, body);
export const patch = (path, body) => api('PATCH', path, body);
export const del = (path) => api('DELETE', path);
