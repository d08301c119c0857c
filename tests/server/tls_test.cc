// TLS and mTLS between real processes (certificates made with openssl for this test): memtier,
// coordinator and a worker talk mTLS; the public API on the coordinator takes TLS clients without
// certificates (--tls-optional-client-cert); a worker's own port requires a client certificate;
// plaintext clients and components without certificates are refused.
#include <filesystem>

#include "gtest/gtest.h"
#include "tests/model/test_models.h"
#include "common/net.h"
#include "tests/process_util.h"

namespace flashmem::testing {
namespace {

using Result = ShellResult;
Result Shell(const std::string& cmd) { return RunShell(cmd); }

TEST(Tls, ComponentsTalkMtlsAndThePublicApiTakesTlsClients) {
  const std::string d = TempDir("tls");
  // A CA and one certificate for 127.0.0.1 usable as server and client.
  const std::string certs =
      "cd " + d + " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=flashmem-test-ca" +
      " && openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr -subj /CN=127.0.0.1" +
      " && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n' > ext.cnf" +
      " && openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out node.pem -days 2 -extfile ext.cnf";
  Result c = Shell(certs);
  ASSERT_EQ(c.code, 0) << c.out;
  ASSERT_EQ(Shell(std::string(FLASHMEM_BIN) + " ckpt random --preset tiny --layers 2 --seed 3 --out " + d + "/m").code, 0);
  const std::vector<std::string> tls = {"--tls-cert", d + "/node.pem", "--tls-key", d + "/node.key", "--tls-ca", d + "/ca.pem"};
  auto with = [&](std::vector<std::string> a, const std::vector<std::string>& extra) {
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  Child memtier = Spawn(FLASHMEM_MEMTIER_BIN, with({"--grpc-listen", "127.0.0.1:0", "--data-dir", d + "/mt", "--ram-bytes", "268435456"}, tls));
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  const std::string health_addr = "127.0.0.1:" + std::to_string(FreeLoopbackPort());
  Child coord = Spawn(FLASHMEM_COORDINATOR_BIN, with({"--listen", "127.0.0.1:0", "--data-dir", d + "/coord",
                                                      "--tls-optional-client-cert", "--health-listen", health_addr}, tls));
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  // Probes that cannot speak TLS (the kubelet's gRPC probe) use the plaintext --health-listen;
  // the TLS listener answers health checks only over TLS.
  const std::string health = std::string(FLASHMEM_BIN) + " health --timeout-s 5 --target ";
  Result probe = Shell(health + health_addr);
  EXPECT_EQ(probe.code, 0) << probe.out;
  EXPECT_NE(probe.out.find("SERVING"), std::string::npos) << probe.out;
  EXPECT_EQ(Shell(health + coord.target).code, 2);
  Result tls_probe = Shell(health + coord.target + " --tls-ca " + d + "/ca.pem");
  EXPECT_EQ(tls_probe.code, 0) << tls_probe.out;
  Child worker = Spawn(FLASHMEM_WORKER_BIN, with({"--model", d + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                                  "--coordinator", coord.target}, tls));
  ASSERT_FALSE(worker.target.empty()) << worker.output;
  const std::string complete = std::string(FLASHMEM_BIN) + " complete --max-tokens 4 --prompt 'over TLS' ";
  // Public API on the coordinator: TLS client without a certificate.
  Result ok = Shell(complete + "--target " + coord.target + " --tls-ca " + d + "/ca.pem");
  EXPECT_EQ(ok.code, 0) << ok.out;
  EXPECT_NE(ok.out.find("over TLS"), std::string::npos) << ok.out;
  // Plaintext is refused.
  Result plain = Shell(complete + "--target " + coord.target);
  EXPECT_NE(plain.code, 0) << plain.out;
  // The worker's own port requires a client certificate.
  Result no_cert = Shell(complete + "--target " + worker.target + " --tls-ca " + d + "/ca.pem");
  EXPECT_NE(no_cert.code, 0) << no_cert.out;
  Result mtls = Shell(complete + "--target " + worker.target + " --tls-ca " + d + "/ca.pem --tls-cert " + d + "/node.pem --tls-key " +
                    d + "/node.key");
  EXPECT_EQ(mtls.code, 0) << mtls.out;
  // A worker without certificates cannot join the cluster.
  Child rogue = Spawn(FLASHMEM_WORKER_BIN, {"--model", d + "/m", "--listen", "127.0.0.1:0", "--coordinator", coord.target},
                      std::chrono::seconds(30));
  EXPECT_TRUE(rogue.target.empty()) << rogue.output;
  Stop(rogue);
  // Bad flags are clear.
  Result bad = Shell(std::string(FLASHMEM_COORDINATOR_BIN) + " --listen 127.0.0.1:0 --data-dir " + d + "/c2 --tls-cert " + d +
                   "/missing.pem --tls-key " + d + "/node.key");
  EXPECT_NE(bad.out.find("--tls-cert"), std::string::npos) << bad.out;
  Stop(worker);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(d);
}

}  // namespace
}  // namespace flashmem::testing
