// Node module hook: @actions/workflow-parser imports its JSON schemas without an import attribute
// (it is built for bundlers), which plain Node refuses. Load those files as JSON modules.
import { readFile } from "node:fs/promises";

export async function load(url, context, nextLoad) {
  if (url.endsWith(".json") && url.includes("/@actions/") && !context.importAttributes?.type) {
    return { format: "json", source: await readFile(new URL(url), "utf8"), shortCircuit: true };
  }
  return nextLoad(url, context);
}
