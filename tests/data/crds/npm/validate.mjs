// Validates custom resources against the upstream CRD schemas compiled into the npm packages
// @kubernetes-models/keda and @kubernetes-models/prometheus-operator (versions in package.json).
//
//   node validate.mjs <node_modules dir> <resources.json>
//
// resources.json: a JSON array of Kubernetes objects. Prints one JSON line per object,
// {"kind", "name", "ok", "error"}; exits 1 if any object fails, 2 if a kind is unknown here.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, resourcesPath] = process.argv.slice(2);
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor.js",
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
};

let status = 0;
for (const resource of JSON.parse(readFileSync(resourcesPath, "utf8"))) {
  const key = `${resource.apiVersion}/${resource.kind}`;
  const name = resource.metadata?.name;
  if (!(key in MODELS)) {
    console.log(JSON.stringify({ kind: key, name, ok: false, error: "no upstream model for this kind" }));
    status = Math.max(status, 2);
    continue;
  }
  const module = await import(pathToFileURL(join(modules, MODELS[key])).href);
  const Model = module[resource.kind];
  try {
    new Model(resource).validate();
    console.log(JSON.stringify({ kind: key, name, ok: true }));
  } catch (error) {
    console.log(JSON.stringify({ kind: key, name, ok: false, error: String(error.message ?? error) }));
    status = Math.max(status, 1);
  }
}
process.exit(status);
