#include "tests/deploy/manifest_check.h"

#include <yaml-cpp/yaml.h>

#include <cctype>
#include <regex>
#include <sstream>

namespace flashmem::testing {
namespace {

const std::set<std::string> kBinaries = {"flashmem", "flashmem-worker", "flashmem-memtier", "flashmem-coordinator"};
const std::set<std::string> kClusterScoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                                              "StorageClass", "CustomResourceDefinition", "PriorityClass"};

std::string Str(const YAML::Node& n) { return n && n.IsScalar() ? n.as<std::string>() : std::string(); }

std::vector<std::string> Strings(const YAML::Node& n) {
  std::vector<std::string> out;
  if (n && n.IsSequence())
    for (const auto& x : n) out.push_back(Str(x));
  return out;
}

std::map<std::string, std::string> Labels(const YAML::Node& n) {
  std::map<std::string, std::string> out;
  if (n && n.IsMap())
    for (const auto& kv : n) out[kv.first.as<std::string>()] = Str(kv.second);
  return out;
}

bool Matches(const std::map<std::string, std::string>& selector, const std::map<std::string, std::string>& labels) {
  for (const auto& [k, v] : selector) {
    auto it = labels.find(k);
    if (it == labels.end() || it->second != v) return false;
  }
  return true;
}

// One pod template of a workload, with what its containers declare.
struct PodTemplate {
  std::string owner;  // "StatefulSet/flashmem-worker-g0"
  std::map<std::string, std::string> labels;
  YAML::Node spec;
  bool lws = false;
  std::map<std::string, int> ports;  // containerPort name -> number (all containers)
  std::set<int> port_numbers;
};

bool EnvAllowed(const std::string& name, const std::vector<std::string>& env) {
  for (const auto& e : env) {
    if (!e.empty() && e.back() == '*' ? name.rfind(e.substr(0, e.size() - 1), 0) == 0 : name == e) return true;
  }
  return false;
}

int PortOf(const std::string& address) {  // "0.0.0.0:7000" -> 7000, -1 if none
  const auto c = address.rfind(':');
  if (c == std::string::npos) return -1;
  try {
    return std::stoi(address.substr(c + 1));
  } catch (...) {
    return -1;
  }
}

class Checker {
 public:
  Checker(const HelpFn& help, std::string ns) : help_(help), ns_(std::move(ns)) {}

  std::vector<std::string> Run(const std::string& yaml) {
    std::vector<YAML::Node> docs;
    try {
      docs = YAML::LoadAll(yaml);
    } catch (const std::exception& e) {
      return {std::string("YAML: ") + e.what()};
    }
    for (const auto& d : docs) {
      if (!d || !d.IsMap()) continue;
      const std::string kind = Str(d["kind"]), name = Str(d["metadata"]["name"]);
      if (!kClusterScoped.count(kind) && Str(d["metadata"]["namespace"]) != ns_)
        Error(kind + "/" + name, "namespace '" + Str(d["metadata"]["namespace"]) + "', want '" + ns_ + "'");
      if (kind == "ConfigMap")
        for (const auto& kv : d["data"]) config_maps_[name][kv.first.as<std::string>()] = Str(kv.second);
      if (kind == "StatefulSet" || kind == "DaemonSet" || kind == "Deployment" || kind == "Job")
        AddTemplate(kind + "/" + name, d["spec"]["template"], false);
      if (kind == "LeaderWorkerSet")
        for (const char* t : {"leaderTemplate", "workerTemplate"})
          if (d["spec"]["leaderWorkerTemplate"][t]) AddTemplate(kind + "/" + name + "/" + t, d["spec"]["leaderWorkerTemplate"][t], true);
    }
    for (auto& pt : templates_) CheckPods(pt);
    for (const auto& d : docs) {
      if (!d || !d.IsMap()) continue;
      const std::string kind = Str(d["kind"]), name = Str(d["metadata"]["name"]);
      if (kind == "Service") CheckService(name, d);
      if (kind == "NetworkPolicy") CheckNetworkPolicy(name, d);
      if (kind == "ServiceMonitor") CheckServiceMonitor(name, d, docs);
    }
    return errors_;
  }

 private:
  void Error(const std::string& where, const std::string& what) { errors_.push_back(where + ": " + what); }

  void AddTemplate(const std::string& owner, const YAML::Node& tpl, bool lws) {
    PodTemplate pt;
    pt.owner = owner;
    pt.labels = Labels(tpl["metadata"]["labels"]);
    pt.spec = tpl["spec"];
    pt.lws = lws;
    for (const char* list : {"initContainers", "containers"})
      for (const auto& c : pt.spec[list])
        for (const auto& p : c["ports"]) {
          const int n = p["containerPort"].as<int>(-1);
          pt.port_numbers.insert(n);
          if (p["name"]) pt.ports[Str(p["name"])] = n;
        }
    templates_.push_back(pt);
  }

  const BinaryInterface& Interface(const std::string& binary, const std::vector<std::string>& subs) {
    std::string key = binary;
    for (const auto& s : subs) key += " " + s;
    auto it = interfaces_.find(key);
    if (it == interfaces_.end()) it = interfaces_.emplace(key, ParseHelp(help_(binary, subs))).first;
    return it->second;
  }

  void CheckPods(const PodTemplate& pt) {
    if (!pt.spec || !pt.spec["containers"] || pt.spec["containers"].size() == 0) Error(pt.owner, "no containers");
    for (const char* list : {"initContainers", "containers"})
      for (const auto& c : pt.spec[list]) CheckContainer(pt, c);
  }

  void CheckContainer(const PodTemplate& pt, const YAML::Node& c) {
    const std::string where = pt.owner + " container " + Str(c["name"]);
    const auto command = Strings(c["command"]);
    if (command.empty()) return Error(where, "no command: the binary it runs must be explicit");
    const std::string binary = command[0].substr(command[0].rfind('/') + 1);
    if (!kBinaries.count(binary)) return Error(where, "runs '" + command[0] + "', not a flashmem binary");
    std::vector<std::string> all(command.begin() + 1, command.end());
    for (const auto& a : Strings(c["args"])) all.push_back(a);
    std::vector<std::string> subs;
    for (const auto& a : all) {
      if (!a.empty() && a[0] == '-') break;
      subs.push_back(a);
    }
    const BinaryInterface& iface = Interface(binary, subs);
    if (iface.flags.empty()) return Error(where, "no --help from " + binary + (subs.empty() ? "" : " " + subs[0]));
    // Flags, and the ports the listen flags open.
    std::set<int> listen_ports;
    std::set<int> health_ports;
    for (const auto& a : all) {
      if (a.rfind("--", 0) != 0) continue;
      const auto eq = a.find('=');
      const std::string flag = a.substr(0, eq);
      if (!iface.flags.count(flag)) Error(where, "passes " + flag + ", which " + binary + " does not have");
      if (eq != std::string::npos && flag.size() > 6 && flag.compare(flag.size() - 6, 6, "listen") == 0) {
        const int port = PortOf(a.substr(eq + 1));
        if (port <= 0) continue;
        listen_ports.insert(port);
        if (flag == "--health-listen") health_ports.insert(port);
      }
    }
    std::set<int> declared;
    for (const auto& p : c["ports"]) declared.insert(p["containerPort"].as<int>(-1));
    for (int p : listen_ports)
      if (!declared.count(p)) Error(where, "listens on " + std::to_string(p) + " but declares no such containerPort");
    for (int p : declared)
      if (!listen_ports.count(p) && !TpStorePort(all, p))
        Error(where, "declares containerPort " + std::to_string(p) + " that no flag opens");
    for (const char* probe : {"startupProbe", "readinessProbe", "livenessProbe"}) {
      const YAML::Node pr = c[probe];
      if (!pr) continue;
      if (pr["grpc"]) {
        const int port = pr["grpc"]["port"].as<int>(-1);
        if (!health_ports.count(port))
          Error(where, std::string(probe) + " gRPC port " + std::to_string(port) + " is not its --health-listen port (plaintext)");
      }
      for (const char* kind : {"httpGet", "tcpSocket"})
        if (pr[kind]) Error(where, std::string(probe) + " uses " + kind + "; flashmem binaries answer grpc.health.v1");
    }
    // Environment.
    std::set<std::string> defined, refs;
    std::map<std::string, std::string> values;  // literal values known from the rendering
    for (const auto& e : c["env"]) {
      defined.insert(Str(e["name"]));
      if (e["value"]) values[Str(e["name"])] = Str(e["value"]);
    }
    for (const auto& ef : c["envFrom"]) {
      if (ef["configMapRef"]) {
        const std::string cm = Str(ef["configMapRef"]["name"]);
        auto it = config_maps_.find(cm);
        if (it == config_maps_.end()) Error(where, "envFrom ConfigMap '" + cm + "' is not in the rendering");
        else
          for (const auto& [k, v] : it->second) {
            defined.insert(k);
            values[k] = v;
          }
      } else {
        Error(where, "envFrom other than a ConfigMap: its variables cannot be checked");
      }
    }
    static const std::regex ref(R"(\$\(([A-Za-z_][A-Za-z0-9_]*)\))");
    for (const auto& a : all)
      for (std::sregex_iterator m(a.begin(), a.end(), ref), end; m != end; ++m) refs.insert((*m)[1].str());
    for (const auto& name : defined)
      if (!refs.count(name) && !EnvAllowed(name, iface.env))
        Error(where, "gets env " + name + ", which " + binary + " does not read and its args do not use");
    for (const auto& name : refs)
      if (!defined.count(name) && !(pt.lws && name.rfind("LWS_", 0) == 0))
        Error(where, "uses $(" + name + ") but defines no such variable");
    // Requests and limits.
    for (const char* side : {"requests", "limits"})
      for (const char* res : {"cpu", "memory"})
        if (!c["resources"][side][res]) Error(where, std::string("no resources.") + side + "." + res);
    // memtier's RAM tier is memfd memory charged to its own container: the limit must hold it.
    if (binary == "flashmem-memtier") {
      std::string ram;
      for (const auto& a : all)
        if (a.rfind("--ram-bytes=", 0) == 0) ram = a.substr(12);
      static const std::regex var(R"(^\$\(([A-Za-z_][A-Za-z0-9_]*)\)$)");
      std::smatch m;
      if (std::regex_match(ram, m, var)) ram = values.count(m[1].str()) ? values[m[1].str()] : "";
      const double ram_bytes = Quantity(ram), limit = Quantity(Str(c["resources"]["limits"]["memory"]));
      if (ram_bytes <= 0) Error(where, "--ram-bytes is not a number the rendering gives ('" + ram + "')");
      else if (limit < ram_bytes * 1.04 + (256 << 20))
        Error(where, "memory limit " + Str(c["resources"]["limits"]["memory"]) + " cannot hold --ram-bytes " + ram +
                         " plus 4% and 256 MiB of headroom");
    }
  }

  // A Kubernetes quantity ("1536Mi", "400Gi", "1G", "123") in bytes; -1 when unreadable.
  static double Quantity(const std::string& q) {
    static const std::map<std::string, double> units = {{"", 1},         {"k", 1e3},          {"M", 1e6},
                                                        {"G", 1e9},      {"T", 1e12},         {"Ki", 1024.0},
                                                        {"Mi", 1 << 20}, {"Gi", 1 << 30},     {"Ti", 1099511627776.0}};
    size_t i = 0;
    while (i < q.size() && (std::isdigit(static_cast<unsigned char>(q[i])) || q[i] == '.')) ++i;
    auto u = units.find(q.substr(i));
    if (i == 0 || u == units.end()) return -1;
    return std::stod(q.substr(0, i)) * u->second;
  }

  // The group store port a worker opens through --tp-leader (host:port of rank 0).
  static bool TpStorePort(const std::vector<std::string>& args, int port) {
    for (const auto& a : args)
      if (a.rfind("--tp-leader=", 0) == 0 && PortOf(a) == port) return true;
    return false;
  }

  std::vector<const PodTemplate*> Selected(const std::map<std::string, std::string>& selector) {
    std::vector<const PodTemplate*> out;
    for (const auto& pt : templates_)
      if (Matches(selector, pt.labels)) out.push_back(&pt);
    return out;
  }

  void CheckService(const std::string& name, const YAML::Node& d) {
    const auto pods = Selected(Labels(d["spec"]["selector"]));
    if (pods.empty()) return Error("Service/" + name, "selects no pod template");
    for (const auto& p : d["spec"]["ports"]) {
      const YAML::Node tp = p["targetPort"] ? p["targetPort"] : p["port"];
      const std::string t = Str(tp);
      bool found = false;
      for (const auto* pt : pods) {
        int num = -1;
        try {
          num = std::stoi(t);
        } catch (...) {
        }
        found = found || pt->ports.count(t) || pt->port_numbers.count(num);
      }
      if (!found) Error("Service/" + name, "targetPort " + t + " is not a port of the pods it selects");
    }
  }

  void CheckNetworkPolicy(const std::string& name, const YAML::Node& d) {
    const auto selector = Labels(d["spec"]["podSelector"]["matchLabels"]);
    const auto pods = Selected(selector);
    if (!selector.empty() && pods.empty()) return Error("NetworkPolicy/" + name, "selects no pod template");
    for (const auto& rule : d["spec"]["ingress"])
      for (const auto& p : rule["ports"]) {
        if (p["endPort"]) continue;  // a range (UCX's data ports), opened by UCX_TCP_PORT_RANGE
        const int port = p["port"].as<int>(-1);
        bool found = false;
        for (const auto* pt : pods) found = found || pt->port_numbers.count(port);
        if (!found) Error("NetworkPolicy/" + name, "allows port " + std::to_string(port) + ", which no selected pod declares");
      }
  }

  void CheckServiceMonitor(const std::string& name, const YAML::Node& d, const std::vector<YAML::Node>& docs) {
    const auto selector = Labels(d["spec"]["selector"]["matchLabels"]);
    int services = 0;
    for (const auto& s : docs) {
      if (!s || Str(s["kind"]) != "Service" || !Matches(selector, Labels(s["metadata"]["labels"]))) continue;
      ++services;
      for (const auto& ep : d["spec"]["endpoints"]) {
        bool found = false;
        for (const auto& p : s["spec"]["ports"]) found = found || Str(p["name"]) == Str(ep["port"]);
        if (!found) Error("ServiceMonitor/" + name, "endpoint port '" + Str(ep["port"]) + "' missing on Service/" + Str(s["metadata"]["name"]));
      }
    }
    if (services == 0) Error("ServiceMonitor/" + name, "selects no Service");
  }

  HelpFn help_;
  std::string ns_;
  std::map<std::string, std::map<std::string, std::string>> config_maps_;
  std::vector<PodTemplate> templates_;
  std::map<std::string, BinaryInterface> interfaces_;
  std::vector<std::string> errors_;
};

}  // namespace

BinaryInterface ParseHelp(const std::string& help) {
  BinaryInterface b;
  std::istringstream in(help);
  std::string line;
  bool env = false;
  while (std::getline(in, line)) {
    const auto start = line.find_first_not_of(' ');
    if (start == std::string::npos) continue;
    if (line.compare(start, 12, "Environment:") == 0) {
      env = true;
      continue;
    }
    const std::string body = line.substr(start);
    if (env) {
      if (start == 0) env = false;  // a new unindented section
      else if (body != "(none)") b.env.push_back(body.substr(0, body.find(' ')));
      continue;
    }
    if (body[0] != '-') continue;
    std::istringstream names(body.substr(0, body.find(' ')));
    std::string n;
    while (std::getline(names, n, ','))
      if (n.rfind("--", 0) == 0) b.flags.insert(n);
  }
  return b;
}

std::vector<std::string> CheckManifests(const std::string& yaml, const HelpFn& help, const std::string& namespace_name) {
  return Checker(help, namespace_name).Run(yaml);
}

}  // namespace flashmem::testing
