// The Kubernetes manifests (deploy/k8s) against the binaries of this build: every overlay renders,
// and passes only flags, ports and environment variables the binaries have (manifest_check.h).
// The offline schema validation of the same renderings is deploy_schema_test (validate.mjs).
#include <cstdlib>

#include "gtest/gtest.h"
#include "tests/deploy/manifest_check.h"
#include "tests/process_util.h"

namespace flashmem::testing {
namespace {

const std::map<std::string, std::string> kBinaryPaths = {
    {"flashmem", FLASHMEM_BIN},
    {"flashmem-worker", FLASHMEM_WORKER_BIN},
    {"flashmem-memtier", FLASHMEM_MEMTIER_BIN},
    {"flashmem-coordinator", FLASHMEM_COORDINATOR_BIN}};

std::string BuiltHelp(const std::string& binary, const std::vector<std::string>& subs) {
  auto it = kBinaryPaths.find(binary);
  if (it == kBinaryPaths.end()) return "";
  std::string cmd = it->second;
  for (const auto& s : subs) cmd += " '" + s + "'";
  return RunShell(cmd + " --help").out;
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += s + "\n";
  return out;
}

class Overlay : public ::testing::TestWithParam<const char*> {};

TEST_P(Overlay, RendersAndMatchesTheBinaries) {
  const ShellResult r = RunShell(std::string(FLASHMEM_SOURCE_DIR) + "/deploy/k8s/render.sh " + GetParam() + " 2>/dev/null");
  ASSERT_EQ(r.code, 0) << "render " << GetParam() << ":\n" << RunShell(std::string(FLASHMEM_SOURCE_DIR) + "/deploy/k8s/render.sh " + GetParam()).out;
  ASSERT_NE(r.out.find("kind: ConfigMap"), std::string::npos) << r.out;
  const auto errors = CheckManifests(r.out, BuiltHelp);
  EXPECT_TRUE(errors.empty()) << GetParam() << ":\n" << Join(errors);
}

INSTANTIATE_TEST_SUITE_P(DeployK8s, Overlay, ::testing::Values("base", "overlays/dev", "overlays/gpu", "overlays/gpu-lws"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (auto& c : n)
                             if (c == '/' || c == '-') c = '_';
                           return n;
                         });

TEST(ParseHelp, ReadsFlagsAndTheEnvironmentSection) {
  const BinaryInterface b = ParseHelp(BuiltHelp("flashmem-worker", {}));
  EXPECT_TRUE(b.flags.count("--listen"));
  EXPECT_TRUE(b.flags.count("--health-listen"));
  EXPECT_TRUE(b.flags.count("--help"));
  EXPECT_FALSE(b.flags.count("--grpc-listen"));
  EXPECT_NE(std::find(b.env.begin(), b.env.end(), "UCX_*"), b.env.end()) << Join(b.env);
  const BinaryInterface ck = ParseHelp(BuiltHelp("flashmem", {"ckpt", "random"}));
  EXPECT_TRUE(ck.flags.count("--preset"));
  EXPECT_TRUE(ParseHelp(BuiltHelp("flashmem-coordinator", {})).env.empty());
}

// The checker itself: a manifest with one of each mistake gets one error for each.
TEST(CheckManifests, ReportsEveryKindOfRot) {
  const std::string bad = R"(
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, namespace: flashmem}
data: {MODEL_DIR: /m, STALE_SETTING: "1", UCX_TLS: tcp}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: w, namespace: flashmem}
spec:
  template:
    metadata: {labels: {app: w}}
    spec:
      containers:
      - name: worker
        command: [/opt/flashmem/bin/flashmem-worker]
        args: [--listen=0.0.0.0:7080, --health-listen=0.0.0.0:7081, --model=$(MODEL_DIR), --no-such-flag=1, --device=$(UNDEFINED)]
        envFrom: [{configMapRef: {name: cfg}}]
        ports: [{name: grpc, containerPort: 7080}, {name: stale, containerPort: 7099}]
        readinessProbe: {grpc: {port: 7080}}
        resources: {requests: {cpu: "1", memory: 1Gi}, limits: {cpu: "1"}}
      - name: shell
        image: busybox
        command: [/bin/sh, -c, "sleep 1"]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: m, namespace: flashmem}
spec:
  template:
    metadata: {labels: {app: m}}
    spec:
      containers:
      - name: memtier
        command: [/opt/flashmem/bin/flashmem-memtier]
        args: [--data-dir=/d, --ram-bytes=$(RAM)]
        env: [{name: RAM, value: "8589934592"}]
        resources: {requests: {cpu: "1", memory: 8Gi}, limits: {cpu: "1", memory: 8Gi}}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: flashmem}
spec:
  selector: {app: w}
  ports: [{name: metrics, port: 9, targetPort: metrics}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: n, namespace: default}
spec:
  podSelector: {matchLabels: {app: w}}
  ingress: [{ports: [{port: 1234}]}]
)";
  const auto errors = CheckManifests(bad, BuiltHelp);
  const std::string all = Join(errors);
  for (const char* want : {"passes --no-such-flag", "gets env STALE_SETTING", "uses $(UNDEFINED)", "listens on 7081 but declares no such containerPort",
                           "declares containerPort 7099 that no flag opens", "is not its --health-listen port", "no resources.limits.memory",
                           "runs '/bin/sh', not a flashmem binary", "targetPort metrics is not a port", "allows port 1234",
                           "namespace 'default'", "memory limit 8Gi cannot hold --ram-bytes 8589934592"})
    EXPECT_NE(all.find(want), std::string::npos) << "missing: " << want << "\n" << all;
  EXPECT_EQ(all.find("UCX_TLS"), std::string::npos) << all;  // UCX_* is read by the worker
  EXPECT_EQ(all.find("MODEL_DIR"), std::string::npos) << all;  // used as $(MODEL_DIR)
}

}  // namespace
}  // namespace flashmem::testing
