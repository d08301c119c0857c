// Offline schema validation of rendered Kubernetes manifests (multi-document YAML files given as
// arguments, or stdin): every object is checked against the schema of its apiVersion/kind from
// kubernetes-models (the Kubernetes OpenAPI), @kubernetes-models/prometheus-operator, or, for
// LeaderWorkerSet (no published model), the schema below plus its pod template checked as a
// Kubernetes PodTemplateSpec. An object of a kind with no schema here is an error, never a pass.
// Exit status: 0 all valid, 1 any error (each printed with the object and the field path).
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import Ajv from "ajv";

const CORE = "kubernetes-models";
const EXTRA = { "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1" };

// sigs.k8s.io/lws api/leaderworkerset/v1 (the fields flashmem uses and their types).
const ajv = new Ajv({ allErrors: true, strict: false });
const lwsSchema = {
  type: "object",
  required: ["apiVersion", "kind", "metadata", "spec"],
  properties: {
    metadata: { type: "object", required: ["name"], properties: { name: { type: "string", pattern: "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" } } },
    spec: {
      type: "object",
      additionalProperties: false,
      required: ["leaderWorkerTemplate"],
      properties: {
        replicas: { type: "integer", minimum: 0 },
        startupPolicy: { enum: ["LeaderCreated", "LeaderReady"] },
        networkConfig: { type: "object", properties: { subdomainPolicy: { enum: ["Shared", "UniquePerReplica"] } } },
        rolloutStrategy: {
          type: "object",
          additionalProperties: false,
          properties: {
            type: { enum: ["RollingUpdate"] },
            rollingUpdateConfiguration: {
              type: "object",
              additionalProperties: false,
              properties: { maxUnavailable: { type: ["integer", "string"] }, maxSurge: { type: ["integer", "string"] } },
            },
          },
        },
        leaderWorkerTemplate: {
          type: "object",
          additionalProperties: false,
          required: ["workerTemplate"],
          properties: {
            size: { type: "integer", minimum: 1 },
            restartPolicy: { enum: ["RecreateGroupOnPodRestart", "None"] },
            leaderTemplate: { type: "object" },
            workerTemplate: { type: "object" },
            subGroupPolicy: { type: "object" },
          },
        },
      },
    },
  },
};
const validateLws = ajv.compile(lwsSchema);

async function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const base = EXTRA[apiVersion] ?? (group ? `${CORE}/${group}/${version}` : `${CORE}/${version}`);
  try {
    const m = await import(`${base}/${kind}`);
    return m[kind];
  } catch {
    return null;
  }
}

async function validateObject(obj) {
  const errors = [];
  if (obj.apiVersion === "leaderworkerset.x-k8s.io/v1" && obj.kind === "LeaderWorkerSet") {
    if (!validateLws(obj)) for (const e of validateLws.errors) errors.push(`${e.instancePath || "/"} ${e.message}`);
    const { PodTemplateSpec } = await import(`${CORE}/v1/PodTemplateSpec`);
    for (const t of ["leaderTemplate", "workerTemplate"]) {
      const tpl = obj.spec?.leaderWorkerTemplate?.[t];
      if (!tpl) continue;
      try { new PodTemplateSpec(tpl).validate(); } catch (e) { errors.push(`/spec/leaderWorkerTemplate/${t}: ${e.message}`); }
    }
    return errors;
  }
  const Model = await modelFor(obj.apiVersion, obj.kind);
  if (!Model) return [`no schema for ${obj.apiVersion} ${obj.kind}`];
  try { new Model(obj).validate(); } catch (e) { errors.push(e.message); }
  return errors;
}

const inputs = process.argv.length > 2 ? process.argv.slice(2).map((f) => [f, readFileSync(f, "utf8")]) : [["<stdin>", readFileSync(0, "utf8")]];
let objects = 0, failed = 0;
for (const [file, text] of inputs) {
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length) { console.error(`${file}: YAML: ${doc.errors[0].message}`); failed++; continue; }
    const obj = doc.toJS();
    if (obj == null) continue;
    objects++;
    const name = `${file}: ${obj.kind ?? "?"}/${obj.metadata?.name ?? "?"}`;
    if (!obj.apiVersion || !obj.kind) { console.error(`${name}: apiVersion and kind are required`); failed++; continue; }
    const errors = await validateObject(obj);
    if (errors.length) { failed++; for (const e of errors) console.error(`${name}: ${e}`); }
  }
}
console.log(`${objects} objects, ${failed} invalid`);
process.exit(failed || objects === 0 ? 1 : 0);
