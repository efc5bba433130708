// needle serve driven by the official client libraries, as users' applications drive it: the
// `openai` npm package (OpenAI's API) and the `ollama` npm package (Ollama's), chat and completion,
// whole and streamed, several requests at once, and one refusal each. Every answer must equal
// what `needle generate` printed for the same prompt and settings (greedy), read from want.json.
// Usage (tests/clients/run.sh): node clients.mjs BASE_URL MODEL want.json
import fs from 'node:fs';
import OpenAI from 'openai';
import { Ollama } from 'ollama';

const [base, model, wantFile] = process.argv.slice(2);
const want = JSON.parse(fs.readFileSync(wantFile, 'utf8'));
const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
const ollama = new Ollama({ host: base });
const failures = [];
let checks = 0;
const check = (what, got, expected) => {
  checks += 1;
  if (got !== expected) failures.push({ what, got, expected });
};

// OpenAI's API.
const completion = async (p, stream) => {
  const req = { model, prompt: p.prompt, max_tokens: p.n, temperature: 0 };
  if (!stream) return (await openai.completions.create(req)).choices[0].text;
  let text = '';
  for await (const c of await openai.completions.create({ ...req, stream: true }))
    text += c.choices[0]?.text ?? '';
  return text;
};
const chat = async (p, stream) => {
  const req = { model, messages: [{ role: 'user', content: p.prompt }], max_tokens: p.n };
  if (!stream) return (await openai.chat.completions.create(req)).choices[0].message.content;
  let text = '';
  for await (const c of await openai.chat.completions.create({ ...req, stream: true }))
    text += c.choices[0]?.delta?.content ?? '';
  return text;
};
// Ollama's API.
const generate = async (p, stream) => {
  const req = { model, prompt: p.prompt, options: { num_predict: p.n } };
  if (!stream) return (await ollama.generate({ ...req, stream: false })).response;
  let text = '';
  for await (const part of await ollama.generate({ ...req, stream: true })) text += part.response;
  return text;
};
const ochat = async (p, stream) => {
  const req = { model, messages: [{ role: 'user', content: p.prompt }], options: { num_predict: p.n } };
  if (!stream) return (await ollama.chat({ ...req, stream: false })).message.content;
  let text = '';
  for await (const part of await ollama.chat({ ...req, stream: true })) text += part.message.content;
  return text;
};

for (const stream of [false, true]) {
  const how = stream ? 'streamed' : 'whole';
  check(`openai completions ${how}`, await completion(want.plain[0], stream), want.plain[0].text);
  check(`openai chat ${how}`, await chat(want.chat, stream), want.chat.text);
  check(`ollama generate ${how}`, await generate(want.plain[0], stream), want.plain[0].text);
  check(`ollama chat ${how}`, await ochat(want.chat, stream), want.chat.text);
}
// Several requests at once, of both APIs, whole and streamed: each its own answer.
const calls = [completion, generate, completion, generate];
const got = await Promise.all(want.plain.map((p, i) => calls[i % 4](p, i % 3 === 1)));
got.forEach((g, i) => check(`concurrent ${i} (${calls[i % 4].name})`, g, want.plain[i].text));
// The model lists.
const models = await openai.models.list();
check('openai models', models.data.map((m) => m.id).join(','), model);
const tags = await ollama.list();
check('ollama tags', tags.models.map((m) => m.name).join(','), `${model}:latest`);
const show = await ollama.show({ model });
check('ollama show family', show.details.family, want.family);
// Refusals as the clients report them.
try {
  await openai.completions.create({ model: 'no-such-model', prompt: 'x', max_tokens: 1 });
  failures.push({ what: 'openai unknown model', got: 'no error' });
} catch (e) {
  check('openai unknown model status', e.status, 404);
}
try {
  await ollama.generate({ model, prompt: 'x', stream: false, options: { top_p: 7 } });
  failures.push({ what: 'ollama bad option', got: 'no error' });
} catch (e) {
  check('ollama bad option status', e.status_code, 400);
  check('ollama bad option names it', String(e.error).includes('options.top_p'), true);
}
console.log(JSON.stringify({ checks, failures }, null, 1));
process.exit(failures.length === 0 ? 0 : 1);
