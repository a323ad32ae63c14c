// Runs a composite action (action.yml) step by step, as the Actions runner does, for the
// end-to-end test of gate's action (tests/test_github_e2e.py).
//
// Parsing, schema validation and step conversion (including the implicit `success() &&` of an
// `if:`) are done by GitHub's own @actions/workflow-parser; every `${{ }}` and `if:` is evaluated
// by GitHub's own @actions/expressions. This file only does what the runner itself does around
// them: contexts (inputs, github, runner, strategy, matrix, env, steps.*.outputs/outcome/
// conclusion), the status functions, `continue-on-error`, bash steps with GITHUB_OUTPUT /
// GITHUB_ENV / GITHUB_PATH / GITHUB_STEP_SUMMARY files and workflow commands (::warning:: ...),
// and post steps. `uses:` steps are recording fakes that keep the behaviour the action relies on
// (each one's source is cited below): a cache with exact and prefix restore, an artifact store,
// and a comment API that can fail.
//
// It also runs one job of a workflow file (its `if:`, a matrix combination, secrets, `run:` steps
// and `uses:` of the composite action under test), so that the example workflows are run too.
//
// Usage: node .ci/run-action.mjs JOB.json, JOB.json holding: "action" (an action.yml) and "with",
// or "workflow", "job_id" and "uses_map" (uses: reference -> local action.yml); "workspace",
// "env", "github", "runner", "strategy", "matrix", "secrets"; "fakes" (python_path, cache_dir,
// artifact_dir, comments_file, comments_fail, token_login); "record" (where the record of every
// step, annotation, fake call, the outputs, the job status and the step summary is written).
// Exit status: 0 when the job succeeded, 1 when it failed, 2 when the action or JOB.json is bad.
// The npm packages come from .ci/node/node_modules (.ci/run installs them), or GATE_NODE_MODULES.
import { execFileSync, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import { register } from "node:module";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

register("./json-hooks.mjs", import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));
const modules = process.env.GATE_NODE_MODULES || path.join(here, "node", "node_modules");
const load = (rel) => import(pathToFileURL(path.join(modules, rel)).href);
const { parseAction, convertActionTemplate } = await load("@actions/workflow-parser/dist/actions/index.js");
const { NoOperationTraceWriter, parseWorkflow, convertWorkflowTemplate } = await load("@actions/workflow-parser/dist/index.js");
const { Lexer, Parser, Evaluator, data } = await load("@actions/expressions/dist/index.js");
const { truthy } = await load("@actions/expressions/dist/result.js");

const CONTEXTS = ["github", "inputs", "strategy", "matrix", "steps", "job", "runner", "env", "needs", "secrets", "vars"];
const STATUS_FUNCS = ["always", "success", "failure", "cancelled"];

// ---------------------------------------------------------------------------------------------
// Expressions

function toData(value) {
  return JSON.parse(JSON.stringify(value ?? null), data.reviver);
}

function evaluateExpression(expression, contexts, status) {
  const lexed = new Lexer(expression).lex();
  const infos = [...STATUS_FUNCS.map((name) => ({ name, minArgs: 0, maxArgs: 0 })), { name: "hashFiles", minArgs: 1, maxArgs: 255 }];
  const tree = new Parser(lexed.tokens, CONTEXTS, infos).parse();
  const impl = (name, call, min = 0, max = 0) => [name.toLowerCase(), { name, minArgs: min, maxArgs: max, call }];
  const functions = new Map([
    impl("always", () => new data.BooleanData(true)),
    impl("success", () => new data.BooleanData(status.failed === false)),
    impl("failure", () => new data.BooleanData(status.failed === true)),
    impl("cancelled", () => new data.BooleanData(false)),
    impl("hashFiles", (...patterns) => new data.StringData(hashFiles(patterns.map((p) => p.coerceString()), status.workspace)), 1, 255),
  ]);
  const dict = new data.Dictionary();
  for (const name of CONTEXTS) dict.add(name, toData(contexts[name] ?? {}));
  return new Evaluator(tree, dict, functions).evaluate();
}

// hashFiles as the runner defines it: files under GITHUB_WORKSPACE only (none found: '').
function hashFiles(patterns, workspace) {
  const files = [];
  for (const pattern of patterns) {
    if (pattern.includes("..") || path.isAbsolute(pattern)) continue; // the runner rejects these
    const full = path.join(workspace, pattern);
    if (fs.existsSync(full) && fs.statSync(full).isFile()) files.push(full);
  }
  if (!files.length) return "";
  const outer = crypto.createHash("sha256");
  for (const f of files.sort()) outer.update(crypto.createHash("sha256").update(fs.readFileSync(f)).digest());
  return outer.digest("hex");
}

function tokenValue(token, contexts, status) {
  if (token === undefined || token === null) return undefined;
  if (token.isExpression) return evaluateExpression(token.expression, contexts, status);
  if (token.isLiteral) return toData(token.value ?? String(token));
  throw new Error(`not a scalar: ${token}`);
}

const asString = (token, contexts, status) => {
  const v = tokenValue(token, contexts, status);
  return v === undefined ? undefined : v.coerceString();
};

// ---------------------------------------------------------------------------------------------
// Files the runner hands to each step

function parseKeyValueFile(file) {
  // GITHUB_OUTPUT / GITHUB_ENV: `name=value` or `name<<DELIMITER` ... `DELIMITER`.
  const out = {};
  if (!fs.existsSync(file)) return out;
  const lines = fs.readFileSync(file, "utf8").split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (!line) continue;
    const heredoc = /^([^=]+?)<<(.+)$/.exec(line);
    const eq = line.indexOf("=");
    if (heredoc && (eq < 0 || eq > line.indexOf("<<"))) {
      const body = [];
      for (i++; i < lines.length && lines[i] !== heredoc[2]; i++) body.push(lines[i]);
      if (i >= lines.length) throw new Error(`${file}: no closing delimiter ${heredoc[2]}`);
      out[heredoc[1]] = body.join("\n");
    } else if (eq > 0) {
      out[line.slice(0, eq)] = line.slice(eq + 1);
    } else {
      throw new Error(`${file}: invalid line ${JSON.stringify(line)}`);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The job

function readJob(file) {
  const job = JSON.parse(fs.readFileSync(file, "utf8"));
  for (const key of ["workspace", "record", "fakes"]) {
    if (!(key in job)) throw new Error(`${file}: missing "${key}"`);
  }
  if (!job.action === !job.workflow) throw new Error(`${file}: give "action" (a composite action.yml) or "workflow" and "job_id"`);
  return job;
}

class Run {
  constructor(job) {
    this.job = job;
    this.workspace = job.workspace;
    this.temp = fs.mkdtempSync(path.join(job.runner?.temp || os.tmpdir(), "runner-"));
    this.env = { ...(job.env || process.env) };
    this.summary = path.join(this.temp, "step_summary.md");
    fs.writeFileSync(this.summary, "");
    this.record = { steps: [], annotations: [], calls: [], outputs: {}, status: "success", summary: "" };
    this.posts = [];
    this.counter = 0;
    // A frame is the job's own steps, or one composite action's: its steps context, inputs,
    // action path and whether one of its steps failed (what success()/failure() look at).
    this.jobFrame = { steps: {}, inputs: {}, actionPath: job.action ? path.dirname(job.action) : "", failed: false, env: {} };
  }

  get failed() {
    return this.jobFrame.failed;
  }

  contexts(frame) {
    const runner = { os: "Linux", arch: "X64", name: "fake", temp: this.temp, tool_cache: path.join(this.temp, "tool"), ...this.job.runner };
    return {
      github: { workspace: this.workspace, action_path: frame.actionPath, ...this.job.github },
      inputs: frame.inputs,
      strategy: { "fail-fast": true, "job-index": 0, "job-total": 1, "max-parallel": 1, ...this.job.strategy },
      matrix: this.job.matrix || null,
      needs: this.job.needs || {},
      secrets: this.job.secrets || {},
      vars: this.job.vars || {},
      steps: frame.steps,
      job: { status: frame.failed ? "failure" : "success" },
      runner,
      env: { ...this.env, ...frame.env },
    };
  }

  status(frame) {
    return { failed: frame.failed, workspace: this.workspace };
  }

  annotate(stepName, text) {
    for (const line of text.split("\n")) {
      const m = /^::(warning|error|notice|debug)(?: [^:]*)?::(.*)$/.exec(line);
      if (m) this.record.annotations.push({ level: m[1], message: m[2], step: stepName });
    }
  }

  runnerEnv(c) {
    return {
      GITHUB_WORKSPACE: this.workspace,
      ...(c.github.action_path ? { GITHUB_ACTION_PATH: c.github.action_path } : {}),
      GITHUB_JOB: String(c.github.job ?? ""),
      GITHUB_RUN_ID: String(c.github.run_id ?? ""),
      GITHUB_RUN_ATTEMPT: String(c.github.run_attempt ?? ""),
      GITHUB_REPOSITORY: String(c.github.repository ?? ""),
      GITHUB_EVENT_NAME: String(c.github.event_name ?? ""),
      RUNNER_OS: c.runner.os,
      RUNNER_ARCH: c.runner.arch,
      RUNNER_TEMP: c.runner.temp,
      CI: "true",
      GITHUB_ACTIONS: "true",
    };
  }

  async main() {
    if (this.job.workflow) {
      await this.workflowJob();
    } else {
      const result = this.composite(this.job.action, this.job.with || {}, {}, this.jobFrame);
      this.record.outputs = result.outputs;
      this.record.inputs = result.inputs;
    }
    // Post steps (actions/cache's save), last registered first.
    for (const post of this.posts.reverse()) post();
    if (!this.record.status.startsWith("skipped")) this.record.status = this.failed ? "failure" : "success";
    this.record.summary = fs.readFileSync(this.summary, "utf8");
  }

  // One job of a workflow file: its `if:` (a fork guard, say), then its steps; `uses:` of a
  // local composite action (job.uses_map: reference -> action.yml) runs that action's steps.
  async workflowJob() {
    const file = this.job.workflow;
    const parsed = parseWorkflow({ name: file, content: fs.readFileSync(file, "utf8") }, new NoOperationTraceWriter());
    const template = parsed.value && (await convertWorkflowTemplate(parsed.context, parsed.value));
    const errors = [...parsed.context.errors.getErrors(), ...(template?.errors || []).map((e) => ({ message: e.Message }))];
    if (errors.length || !template) throw new Error(`${file}: ${errors.map((e) => e.message).join("; ")}`);
    const job = template.jobs.find((j) => j.id.value === this.job.job_id);
    if (!job) throw new Error(`${file}: no job ${this.job.job_id}`);
    const frame = { steps: {}, inputs: {}, actionPath: "", failed: false, env: {} };
    this.jobFrame = frame;
    if (!truthy(evaluateExpression(job.if.expression, this.contexts(frame), this.status(frame)))) {
      this.record.status = "skipped";
      return;
    }
    if (job.env) for (const pair of job.env) frame.env[String(pair.key)] = asString(pair.value, this.contexts(frame), this.status(frame)) ?? "";
    const rawJobs = [...parsed.value].find((p) => p.key.value === "jobs").value;
    const rawJob = [...rawJobs].find((p) => p.key.value === this.job.job_id).value;
    const rawSteps = [...[...rawJob].find((p) => p.key.value === "steps").value];
    job.steps.forEach((step, index) => this.step(frame, step, rawSteps[index], index));
  }

  composite(actionFile, given, callerEnv, frame) {
    const text = fs.readFileSync(actionFile, "utf8");
    const parsed = parseAction({ name: actionFile, content: text }, new NoOperationTraceWriter());
    const template = parsed.value && convertActionTemplate(parsed.context, parsed.value);
    // Schema, YAML and expression errors, from parsing and from converting (`if:` is parsed there).
    const errors = parsed.context.errors.getErrors();
    if (errors.length || !template) throw new Error(`${actionFile}: ${errors.map((e) => e.message).join("; ")}`);
    if (template.runs.using !== "composite") throw new Error(`${actionFile}: not a composite action`);
    const rawSteps = [...[...parsed.value].find((p) => p.key.value === "runs").value].find((p) => p.key.value === "steps").value;

    // Inputs: the caller's `with`, else the default (an expression there is evaluated).
    for (const name of Object.keys(given)) {
      if (!(template.inputs || []).some((i) => i.id === name)) this.record.annotations.push({ level: "warning", message: `Unexpected input '${name}'`, step: "" });
    }
    for (const input of template.inputs || []) {
      if (input.id in given) frame.inputs[input.id] = String(given[input.id]);
      else if (input.default !== undefined) frame.inputs[input.id] = asString(input.default, this.contexts(frame), this.status(frame));
      else {
        if (input.required) throw new Error(`Input required and not supplied: ${input.id}`);
        frame.inputs[input.id] = "";
      }
    }
    frame.actionPath = path.dirname(actionFile);
    frame.env = { ...frame.env, ...callerEnv };
    template.runs.steps.forEach((step, index) => this.step(frame, step, [...rawSteps][index], index));
    const c = this.contexts(frame);
    const outputs = {};
    for (const output of template.outputs || []) outputs[output.id] = asString(output.value, c, this.status(frame)) ?? "";
    return { ok: !frame.failed, outputs, inputs: frame.inputs, log: "" };
  }

  step(frame, step, raw, index) {
    const name = step.name ? String(step.name) : (step.uses ? String(step.uses) : `step ${index + 1}`);
    const id = step.id && !step.id.startsWith("__") ? step.id : null;
    const entry = { index: this.counter++, name, id, uses: step.uses ? String(step.uses) : null, ran: false };
    this.record.steps.push(entry);
    const c = this.contexts(frame);
    if (!truthy(evaluateExpression(step.if.expression, c, this.status(frame)))) {
      entry.outcome = entry.conclusion = "skipped";
      if (id) frame.steps[id] = { outputs: {}, outcome: "skipped", conclusion: "skipped" };
      return;
    }
    entry.ran = true;
    const stepEnv = {};
    if (step.env) for (const pair of step.env) stepEnv[String(pair.key)] = asString(pair.value, c, this.status(frame)) ?? "";
    entry.env = stepEnv;
    const rawField = (key) => [...raw].find((p) => p.key.value === key)?.value;
    let result;
    const started = Date.now();
    try {
      if (step.uses) {
        const withValues = {};
        const w = rawField("with");
        if (w) for (const pair of w) withValues[String(pair.key)] = asString(pair.value, c, this.status(frame)) ?? "";
        entry.with = withValues;
        const local = (this.job.uses_map || {})[String(step.uses)];
        if (local) {
          const inner = { steps: {}, inputs: {}, actionPath: "", failed: false, env: { ...frame.env, ...stepEnv } };
          result = this.composite(local, withValues, {}, inner);
          entry.inputs = result.inputs;
        } else {
          result = this.fake(String(step.uses), withValues, { ...frame.env, ...stepEnv }, entry);
        }
      } else {
        const shell = rawField("shell") ? asString(rawField("shell"), c, this.status(frame)) : null;
        result = this.bash(asString(step.run, c, this.status(frame)), { ...frame.env, ...stepEnv }, rawField("working-directory"), c, entry, shell, frame);
      }
    } catch (err) {
      result = { ok: false, outputs: {}, log: `${err.stack || err}` };
    }
    entry.seconds = (Date.now() - started) / 1000;
    entry.log = result.log;
    entry.outputs = result.outputs;
    this.annotate(name, result.log || "");
    entry.outcome = result.ok ? "success" : "failure";
    let continueOnError = step["continue-on-error"];
    if (continueOnError !== undefined && typeof continueOnError !== "boolean") continueOnError = truthy(tokenValue(continueOnError, c, this.status(frame)));
    entry.conclusion = result.ok || continueOnError ? "success" : "failure";
    if (entry.conclusion === "failure") frame.failed = true;
    if (!result.ok && continueOnError) this.record.annotations.push({ level: "warning", message: `step '${name}' failed; continue-on-error`, step: name });
    if (id) frame.steps[id] = { outputs: result.outputs, outcome: entry.outcome, conclusion: entry.conclusion };
  }

  bash(script, stepEnv, workingDirectory, c, entry, shell, frame) {
    const files = {};
    for (const name of ["GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH"]) {
      files[name] = path.join(this.temp, `${name.toLowerCase()}_${entry.index}`);
      fs.writeFileSync(files[name], "");
    }
    const file = path.join(this.temp, `step_${entry.index}.sh`);
    fs.writeFileSync(file, script);
    const cwd = workingDirectory ? path.resolve(this.workspace, asString(workingDirectory, c, this.status(frame))) : this.workspace;
    const env = { ...this.env, ...this.runnerEnv(c), ...stepEnv, ...files, GITHUB_STEP_SUMMARY: this.summary };
    // The runner's command lines: `shell: bash`, and no shell at all in a workflow on Linux.
    if (shell && shell !== "bash") throw new Error(`shell ${shell} is not supported here`);
    const args = shell === "bash" ? ["--noprofile", "--norc", "-eo", "pipefail", file] : ["-e", file];
    const proc = spawnSync("bash", args, { cwd, env, encoding: "utf8", maxBuffer: 1 << 28 });
    const log = (proc.stdout || "") + (proc.stderr || "") + (proc.error ? String(proc.error) : "");
    const newEnv = parseKeyValueFile(files.GITHUB_ENV);
    Object.assign(this.env, newEnv);
    const newPath = fs.readFileSync(files.GITHUB_PATH, "utf8").split("\n").filter(Boolean);
    if (newPath.length) this.env.PATH = [...newPath.reverse(), this.env.PATH].join(path.delimiter);
    return { ok: proc.status === 0, outputs: parseKeyValueFile(files.GITHUB_OUTPUT), log };
  }

  // -------------------------------------------------------------------------------------------
  // Recording fakes for `uses:`

  fake(uses, withValues, stepEnv, entry) {
    const [name, ref] = uses.split("@");
    this.record.calls.push({ uses, with: withValues });
    const fakes = {
      "actions/checkout": () => ({ ok: true, outputs: {}, log: "checked out (the workspace is prepared by the test)\n" }),
      "actions/setup-python": () => this.setupPython(withValues),
      "actions/cache": () => this.cacheRestore(withValues, true),
      "actions/cache/restore": () => this.cacheRestore(withValues, false),
      "actions/cache/save": () => this.cacheSave(withValues, withValues.key),
      "actions/upload-artifact": () => this.upload(withValues),
      "actions/download-artifact": () => this.download(withValues),
      "actions/github-script": () => this.githubScript(withValues, stepEnv),
    };
    if (!fakes[name]) throw new Error(`no fake for ${uses}`);
    entry.ref = ref;
    return fakes[name]();
  }

  setupPython(w) {
    // actions/setup-python: installs python-version and sets the output python-path.
    const python = this.job.fakes.python_path;
    if (!python) return { ok: false, outputs: {}, log: "::error::fake setup-python: no python_path configured" };
    return { ok: true, outputs: { "python-version": w["python-version"], "python-path": python }, log: `python ${w["python-version"]} at ${python}\n` };
  }

  resolvePaths(spec) {
    return spec.split("\n").map((l) => l.trim()).filter(Boolean).map((p) => {
      if (/[*?[]/.test(p)) throw new Error(`fake cache: glob paths are not supported (${p})`);
      if (p.startsWith("~")) p = path.join(this.env.HOME || os.homedir(), p.slice(1));
      return path.resolve(this.workspace, p);
    });
  }

  cacheIndex() {
    const dir = this.job.fakes.cache_dir;
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, "index.json");
    const entries = fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, "utf8")) : [];
    return { dir, file, entries };
  }

  // actions/cache's "version" hashes the path list (and compression): restore and save must
  // name the same paths to meet (@actions/cache getCacheVersion).
  cacheVersion(pathsSpec) {
    const lines = pathsSpec.split("\n").map((l) => l.trim()).filter(Boolean);
    return crypto.createHash("sha256").update([...lines, "zstd-without-long"].join("|")).digest("hex");
  }

  cacheRestore(w, withPost) {
    // actions/cache/restore v5 (src/restoreImpl.ts): exact key first, then each restore key as a
    // prefix, newest entry first; outputs cache-hit only when something was found.
    const { dir, entries } = this.cacheIndex();
    const version = this.cacheVersion(w.path);
    const restoreKeys = (w["restore-keys"] || "").split("\n").map((l) => l.trim()).filter(Boolean);
    const candidates = entries.filter((e) => e.version === version).sort((a, b) => b.seq - a.seq);
    let hit = candidates.find((e) => e.key === w.key);
    for (const prefix of restoreKeys) hit = hit || candidates.find((e) => e.key.startsWith(prefix));
    this.record.calls.at(-1).matched = hit ? hit.key : null;
    const outputs = { "cache-primary-key": w.key };
    let log;
    if (hit) {
      execFileSync("tar", ["-xf", path.join(dir, hit.archive), "-P", "-C", this.workspace]);
      outputs["cache-hit"] = String(hit.key === w.key);
      outputs["cache-matched-key"] = hit.key;
      log = `Cache restored from key: ${hit.key}\n`;
    } else {
      log = `Cache not found for input keys: ${[w.key, ...restoreKeys].join(", ")}\n`;
    }
    if (withPost) {
      // actions/cache's post step: `post-if: success()`, and no save after an exact hit.
      this.posts.push(() => {
        if (this.failed || (hit && hit.key === w.key)) return;
        this.record.calls.push({ uses: "actions/cache (post)", with: w });
        const saved = this.cacheSave(w, w.key);
        this.record.steps.push({ name: `Post ${w.key}`, ran: true, outcome: saved.ok ? "success" : "failure", log: saved.log });
        this.annotate("post", saved.log);
      });
    }
    return { ok: true, outputs, log };
  }

  cacheSave(w, key) {
    // actions/cache/save v5 (src/saveImpl.ts): warnings, never a failure, for missing paths and
    // for a key that already exists (caches are immutable).
    const { dir, file, entries } = this.cacheIndex();
    const version = this.cacheVersion(w.path);
    const present = this.resolvePaths(w.path).filter((p) => fs.existsSync(p));
    if (!present.length) {
      return { ok: true, outputs: {}, log: "::warning::Path Validation Error: Path(s) specified in the action for caching do(es) not exist, hence no cache is being saved.\n" };
    }
    if (entries.some((e) => e.key === key && e.version === version)) {
      return { ok: true, outputs: {}, log: `::warning::Failed to save: Unable to reserve cache with key ${key}, another job may be creating this cache.\n` };
    }
    const seq = entries.length + 1;
    const archive = `${seq}.tar`;
    // As @actions/cache does: paths relative to the workspace (-P keeps any ../), so a cache made
    // in one job's workspace is restored into the next job's.
    execFileSync("tar", ["-cf", path.join(dir, archive), "-P", "-C", this.workspace, ...present.map((p) => path.relative(this.workspace, p))]);
    entries.push({ key, version, seq, archive, paths: present });
    fs.writeFileSync(file, JSON.stringify(entries, null, 1));
    this.record.calls.at(-1).saved = key;
    return { ok: true, outputs: {}, log: `Cache saved with key: ${key}\n` };
  }

  upload(w) {
    // actions/upload-artifact v7: a folder's contents become the artifact (hidden files left
    // out by default); a second upload under one name fails unless overwrite is true.
    const store = this.job.fakes.artifact_dir;
    const target = path.join(store, w.name);
    const source = path.resolve(this.workspace, w.path);
    if (!fs.existsSync(source)) {
      const level = { error: "error", ignore: "debug" }[w["if-no-files-found"]] || "warning";
      return { ok: level !== "error", outputs: {}, log: `::${level}::No files were found with the provided path: ${w.path}. No artifacts will be uploaded.\n` };
    }
    if (fs.existsSync(target)) {
      if (w.overwrite !== "true") return { ok: false, outputs: {}, log: `::error::Failed to CreateArtifact: an artifact with this name already exists on the workflow run: ${w.name}\n` };
      fs.rmSync(target, { recursive: true });
    }
    const hidden = w["include-hidden-files"] === "true";
    fs.cpSync(source, target, { recursive: true, filter: (src) => hidden || !path.basename(src).startsWith(".") || src === source });
    return { ok: true, outputs: { "artifact-id": String(fs.readdirSync(store).length) }, log: `Artifact ${w.name} uploaded\n` };
  }

  download(w) {
    // actions/download-artifact v8 (src/download-artifact.ts): artifacts matching `pattern`; one
    // match (or a `name`) goes straight into `path`, several into `path/<name>/`.
    const store = this.job.fakes.artifact_dir;
    const all = fs.existsSync(store) ? fs.readdirSync(store) : [];
    const glob = (g) => new RegExp(`^${g.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".")}$`);
    const chosen = w.name ? all.filter((a) => a === w.name) : all.filter((a) => !w.pattern || glob(w.pattern).test(a));
    if (w.name && !chosen.length) return { ok: false, outputs: {}, log: `::error::Unable to download artifact(s): Artifact not found for name: ${w.name}\n` };
    const dest = path.resolve(this.workspace, w.path || ".");
    for (const a of chosen) fs.cpSync(path.join(store, a), w.name || chosen.length === 1 ? dest : path.join(dest, a), { recursive: true });
    return { ok: true, outputs: { "download-path": dest }, log: `downloaded ${chosen.join(", ") || "nothing"}\n` };
  }

  githubScript(w, stepEnv) {
    // actions/github-script v8: runs `script` as the body of an async function given github (an
    // authenticated Octokit), context and core; a throw fails the step. The fake Octokit serves
    // issue comments from a JSON file; `comments_fail` makes every API call fail as a read-only
    // token does (403).
    const file = this.job.fakes.comments_file;
    const db = fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, "utf8")) : { comments: [], next: 1 };
    const identity = this.job.fakes.token_login || null; // null: an installation token (GITHUB_TOKEN)
    const failing = Boolean(this.job.fakes.comments_fail);
    // The script runs in a child Node process so that process.env is the step's, as in the runner.
    const input = { script: w.script, env: { ...this.env, ...stepEnv }, db, identity, failing, token: w["github-token"] };
    const env = { ...process.env, GATE_FAKE_GITHUB: JSON.stringify(this.job.github || {}) };
    const child = spawnSync(process.execPath, [path.join(here, "run-action.mjs"), "--github-script"], { input: JSON.stringify(input), encoding: "utf8", env, cwd: this.workspace });
    if (child.status !== 0 && !child.stdout) return { ok: false, outputs: {}, log: child.stderr };
    const reply = JSON.parse(child.stdout.trim().split("\n").at(-1));
    fs.writeFileSync(file, JSON.stringify(reply.db, null, 1));
    this.record.calls.at(-1).api = reply.calls;
    return { ok: reply.ok, outputs: {}, log: reply.log };
  }
}

// The child side of the github-script fake: the Octokit, context and core the script is given.
async function githubScriptChild() {
  const input = JSON.parse(fs.readFileSync(0, "utf8"));
  Object.assign(process.env, input.env);
  const db = input.db;
  const calls = [];
  const me = input.identity || "github-actions[bot]";
  const fail = (message, status) => Object.assign(new Error(message), { status });
  const api = (name, fn) => async (params = {}) => {
    calls.push({ name, params, token: input.token });
    if (input.failing) throw fail("Resource not accessible by integration", 403);
    return { data: fn(params) };
  };
  const github = {
    rest: {
      users: {
        getAuthenticated: api("users.getAuthenticated", () => {
          if (!input.identity) throw fail("Resource not accessible by integration", 403);
          return { login: input.identity };
        }),
      },
      issues: {
        listComments: api("issues.listComments", (p) => db.comments.filter((c) => c.issue_number === p.issue_number)),
        createComment: api("issues.createComment", (p) => {
          const c = { id: db.next++, issue_number: p.issue_number, body: p.body, user: { login: me } };
          db.comments.push(c);
          return c;
        }),
        updateComment: api("issues.updateComment", (p) => {
          const c = db.comments.find((x) => x.id === p.comment_id);
          if (!c) throw fail("Not Found", 404);
          if (c.user.login !== me) throw fail("Forbidden: only the author may edit a comment", 403);
          c.body = p.body;
          return c;
        }),
      },
    },
    paginate: async (method, params) => (await method(params)).data,
  };
  const g = JSON.parse(process.env.GATE_FAKE_GITHUB || "{}");
  const [owner, repo] = String(g.repository || "owner/repo").split("/");
  const context = { repo: { owner, repo }, issue: { owner, repo, number: g.event?.pull_request?.number ?? g.event?.number }, eventName: g.event_name, payload: g.event || {} };
  const lines = [];
  const core = {
    info: (m) => lines.push(m),
    debug: (m) => lines.push(`::debug::${m}`),
    warning: (m) => lines.push(`::warning::${m}`),
    error: (m) => lines.push(`::error::${m}`),
    setFailed: (m) => lines.push(`::error::${m}`),
    setOutput: () => {},
  };
  const { createRequire } = await import("node:module");
  const AsyncFunction = Object.getPrototypeOf(async () => {}).constructor;
  let ok = true;
  try {
    await new AsyncFunction("require", "github", "context", "core", input.script)(createRequire(import.meta.url), github, context, core);
  } catch (err) {
    ok = false;
    lines.push(`::error::Unhandled error: ${err.message}`);
  }
  process.stdout.write(JSON.stringify({ ok, db, calls, log: lines.map((l) => `${l}\n`).join("") }) + "\n");
}

if (process.argv[2] === "--github-script") {
  await githubScriptChild();
} else {
  let job;
  let run;
  try {
    job = readJob(process.argv[2]);
    run = new Run(job);
    await run.main();
  } catch (err) {
    console.error(`run-action: ${err.message}`);
    if (run) fs.writeFileSync(job.record, JSON.stringify({ ...run.record, error: err.message }, null, 1));
    process.exit(2);
  }
  fs.writeFileSync(job.record, JSON.stringify(run.record, null, 1));
  process.exit(run.failed ? 1 : 0);
}
