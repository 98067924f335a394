// The login screen of a server started with --auth. Local mode never shows it.

import { $ } from './dom.js';
import { post } from './api.js';
import { notifyError, dismiss } from './notices.js';

/** Show the login form; resolves with the user name once logged in (or registered). */
export function askLogin(allowRegister) {
  const screen = $('#login-screen');
  const form = $('#login-form');
  const register = $('#register-button');
  register.hidden = !allowRegister;
  screen.hidden = false;
  form.elements.username.focus();

  return new Promise((resolve) => {
    const attempt = async (path) => {
      if (!form.reportValidity()) return;
      const body = { username: form.elements.username.value.trim(), password: form.elements.password.value };
      try {
        const { user } = await post(path, body);
        form.reset();
        screen.hidden = true;
        dismiss('login');
        form.removeEventListener('submit', onSubmit);
        register.removeEventListener('click', onRegister);
        resolve(user);
      } catch (error) {
        notifyError(error, { key: 'login' });
      }
    };
    const onSubmit = (event) => {
      event.preventDefault();
      attempt('/auth/login');
    };
    const onRegister = () => attempt('/auth/register');
    form.addEventListener('submit', onSubmit);
    register.addEventListener('click', onRegister);
  });
}
