// Cross-checks rendered Kubernetes manifests against the flashmem binaries they run, so that a
// manifest cannot rot silently when a flag, port or environment variable changes:
//  - every container runs a flashmem binary, and every --flag it passes is in that binary's
//    (sub)command --help;
//  - every port a --*listen flag opens is a declared containerPort and every containerPort is
//    opened by a flag; probes, Service targetPorts, NetworkPolicy ports and ServiceMonitor
//    endpoints name ports that the selected pods declare;
//  - every environment variable a container gets (env, envFrom of a rendered ConfigMap) is read
//    by its binary (the --help "Environment:" section) or used as $(NAME) in its args, and every
//    $(NAME) it uses is defined (LeaderWorkerSet pods: LWS_* come from the LWS controller);
//  - every container has CPU and memory requests and limits; memtier's memory limit holds its
//    --ram-bytes (the RAM tier is charged to its container) with headroom; every namespaced object
//    is in the flashmem namespace.
#pragma once

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace flashmem::testing {

// What a binary accepts, from its --help text.
struct BinaryInterface {
  std::set<std::string> flags;         // "--listen", ...
  std::vector<std::string> env;        // names, or prefixes ending in '*'
};
BinaryInterface ParseHelp(const std::string& help);

// Returns the --help of `binary` with `subcommands` (e.g. {"ckpt", "random"}).
using HelpFn = std::function<std::string(const std::string& binary, const std::vector<std::string>& subcommands)>;

// Checks a multi-document YAML rendering; returns one line per problem ("Kind/name container: ...").
std::vector<std::string> CheckManifests(const std::string& yaml, const HelpFn& help,
                                        const std::string& namespace_name = "flashmem");

}  // namespace flashmem::testing
