#include "common/tls.h"

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status.h"

namespace flashmem {
namespace {

absl::StatusOr<std::string> Pem(const std::string& path, const char* flag) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": ", text.status().message()));
  if (text->find("-----BEGIN ") == std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": not a PEM file"));
  return *text;
}

// The process's certificate chain and private key (both flags given: callers check).
struct Identity {
  std::string cert, key;
};
absl::StatusOr<Identity> ReadIdentity(const TlsOptions& o) {
  Identity id;
  FM_ASSIGN_OR_RETURN(id.cert, Pem(o.cert_file, "--tls-cert"));
  FM_ASSIGN_OR_RETURN(id.key, Pem(o.key_file, "--tls-key"));
  return id;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsOptions& o) {
  if (!o.enabled()) return grpc::InsecureServerCredentials();
  if (o.cert_file.empty() || o.key_file.empty())
    return absl::InvalidArgumentError("TLS: a listener needs both --tls-cert and --tls-key");
  grpc::SslServerCredentialsOptions ssl(
      o.ca_file.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                        : o.optional_client_cert ? GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY
                                                 : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  FM_ASSIGN_OR_RETURN(const Identity id, ReadIdentity(o));
  ssl.pem_key_cert_pairs.push_back({id.key, id.cert});
  if (!o.ca_file.empty()) {
    auto ca = Pem(o.ca_file, "--tls-ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
  }
  return grpc::SslServerCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsOptions& o) {
  if (!o.enabled()) return grpc::InsecureChannelCredentials();
  if (o.ca_file.empty()) return absl::InvalidArgumentError("TLS: calling a TLS endpoint needs --tls-ca to verify it");
  grpc::SslCredentialsOptions ssl;
  auto ca = Pem(o.ca_file, "--tls-ca");
  if (!ca.ok()) return ca.status();
  ssl.pem_root_certs = *ca;
  if (!o.cert_file.empty() || !o.key_file.empty()) {
    if (o.cert_file.empty() || o.key_file.empty())
      return absl::InvalidArgumentError("TLS: a client identity needs both --tls-cert and --tls-key");
    FM_ASSIGN_OR_RETURN(const Identity id, ReadIdentity(o));
    ssl.pem_cert_chain = id.cert;
    ssl.pem_private_key = id.key;
  }
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<TlsCredentials> MakeTlsCredentials(const TlsOptions& o) {
  auto server = MakeServerCredentials(o);
  if (!server.ok()) return server.status();
  auto channel = MakeChannelCredentials(o);
  if (!channel.ok()) return channel.status();
  return TlsCredentials{*server, *channel};
}

}  // namespace flashmem
