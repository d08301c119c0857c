// TLS for every gRPC endpoint, by flag (the same three flags on every binary):
//   --tls-cert FILE --tls-key FILE   this process's certificate chain and key (PEM): served on its
//                                    listener, and presented as its client identity (mTLS)
//   --tls-ca FILE                    the CA that signs the cluster's certificates: servers verify
//                                    client certificates against it, clients verify servers
// Without them, endpoints are plaintext. A server with --tls-ca requires client certificates
// unless --tls-optional-client-cert is given (public clients without certificates; components
// still present theirs).
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "absl/status/statusor.h"

namespace flashmem {

struct TlsOptions {
  std::string cert_file, key_file, ca_file;
  bool optional_client_cert = false;
  bool enabled() const { return !cert_file.empty() || !key_file.empty() || !ca_file.empty(); }
};

// Registers the flags above on a CLI11 app (templated so this header does not need CLI11);
// `public_api` adds --tls-optional-client-cert.
template <typename App>
void AddTlsFlags(App& app, TlsOptions& o, bool public_api) {
  app.add_option("--tls-cert", o.cert_file, "PEM certificate chain: served on this process's listener and presented to the components it calls");
  app.add_option("--tls-key", o.key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-ca", o.ca_file, "PEM CA of the cluster: verifies the servers this process calls and requires client certificates it signed (mTLS)");
  if (public_api)
    app.add_flag("--tls-optional-client-cert", o.optional_client_cert, "public clients may connect without a certificate");
}

// Listener credentials: plaintext when no TLS flag is set; errors name the flag or file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsOptions& o);
// Channel credentials for calls to other components (or, for clients, to the public API).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsOptions& o);

// Both, for a process that serves and calls other components.
struct TlsCredentials {
  std::shared_ptr<grpc::ServerCredentials> server;
  std::shared_ptr<grpc::ChannelCredentials> channel;
};
absl::StatusOr<TlsCredentials> MakeTlsCredentials(const TlsOptions& o);

}  // namespace flashmem
