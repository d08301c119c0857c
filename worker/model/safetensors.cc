#include "worker/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace flashmem::model {
namespace {

using nlohmann::json;
constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // the safetensors format's own limit

bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (int k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return false;
    i += len;
  }
  return true;
}

absl::Status FileError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}
absl::Status TensorError(const std::string& path, const std::string& tensor, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", tensor, "': ", what));
}

}  // namespace

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kF32: return "F32";
    case DType::kF8E4M3: return "F8_E4M3";
    case DType::kF8E8M0: return "F8_E8M0";
    case DType::kI8: return "I8";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
    case DType::kF64: return "F64";
  }
  return "?";
}

int64_t DTypeSize(DType t) {
  switch (t) {
    case DType::kBF16: case DType::kF16: return 2;
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF8E4M3: case DType::kF8E8M0: case DType::kI8: case DType::kU8: return 1;
    case DType::kI64: case DType::kF64: return 8;
  }
  return 0;
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32, DType::kF8E4M3, DType::kF8E8M0, DType::kI8, DType::kI32, DType::kI64, DType::kU8, DType::kF64})
    if (name == DTypeName(t)) return t;
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype '", name, "'"));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat failed"));
  }
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    return FileError(path, absl::StrCat("truncated: ", f->size_, " bytes, shorter than the 8-byte header length"));
  }
  f->map_ = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return absl::InternalError(absl::StrCat(path, ": mmap failed"));
  }
  const auto* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian u64 (x86/arm hosts are little-endian)
  if (header_len > kMaxHeaderBytes || header_len > f->size_ - 8)
    return FileError(path, absl::StrCat("header length ", header_len, " runs past the end of the file (size ", f->size_, ")"));
  const absl::string_view header(reinterpret_cast<const char*>(base + 8), header_len);
  if (!IsValidUtf8(header)) return FileError(path, "header is not valid UTF-8");
  json j;
  try {
    j = json::parse(header);
  } catch (const std::exception& e) {
    return FileError(path, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return FileError(path, "header must be a JSON object");
  const uint64_t data_size = f->size_ - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;
  std::vector<std::pair<uint64_t, std::string>> spans;  // (begin, name) for the overlap check
  std::map<std::string, uint64_t> ends;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it.value().is_object()) return FileError(path, "__metadata__ must be an object of strings");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string())
          return FileError(path, absl::StrCat("__metadata__.", m.key(), " must be a string"));
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const json& e = it.value();
    if (!e.is_object()) return TensorError(path, name, "entry must be an object");
    if (!e.contains("dtype") || !e["dtype"].is_string()) return TensorError(path, name, "missing string 'dtype'");
    auto dt = ParseDType(e["dtype"].get<std::string>());
    if (!dt.ok()) return TensorError(path, name, dt.status().message());
    TensorView v;
    v.name = name;
    v.dtype = *dt;
    v.file = path;
    if (!e.contains("shape") || !e["shape"].is_array()) return TensorError(path, name, "missing array 'shape'");
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      if (!d.is_number_unsigned()) return TensorError(path, name, absl::StrCat("shape ", e["shape"].dump(), " has a non-integer or negative dimension"));
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / dim)
        return TensorError(path, name, absl::StrCat("shape ", e["shape"].dump(), " overflows"));
      numel *= dim;
      v.shape.push_back(static_cast<int64_t>(dim));
    }
    v.numel = static_cast<int64_t>(numel);
    if (!e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2 ||
        !e["data_offsets"][0].is_number_unsigned() || !e["data_offsets"][1].is_number_unsigned())
      return TensorError(path, name, "'data_offsets' must be two non-negative integers");
    const uint64_t b = e["data_offsets"][0].get<uint64_t>(), en = e["data_offsets"][1].get<uint64_t>();
    if (b > en || en > data_size)
      return TensorError(path, name, absl::StrCat("data_offsets [", b, ", ", en, "] out of range (data section is ", data_size, " bytes)"));
    const uint64_t want = numel * static_cast<uint64_t>(DTypeSize(v.dtype));
    if (en - b != want)
      return TensorError(path, name, absl::StrCat("holds ", en - b, " bytes but ", DTypeName(v.dtype), " ", e["shape"].dump(), " needs ", want));
    v.bytes = std::span<const uint8_t>(data + b, en - b);
    spans.emplace_back(b, name);
    ends[name] = en;
    f->tensors_.emplace(name, std::move(v));
  }
  std::sort(spans.begin(), spans.end());
  uint64_t max_end = 0;
  std::string max_end_name;
  for (const auto& [begin, name] : spans) {
    const uint64_t end = ends[name];
    if (end > begin && begin < max_end)
      return TensorError(path, name, absl::StrCat("data overlaps tensor '", max_end_name, "'"));
    if (end > max_end) { max_end = end; max_end_name = name; }
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto ckpt = std::make_unique<Checkpoint>();
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    FM_ASSIGN_OR_RETURN(std::string index_text, ReadFileToString(index_path.string()));
    json j;
    try {
      j = json::parse(index_text);
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": not valid JSON: ", e.what()));
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": missing object 'weight_map'"));
    std::map<std::string, SafetensorsFile*> opened;
    std::map<std::string, std::string> weight_map;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map entry for tensor '", it.key(), "' must be a file name"));
      const std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": tensor '", it.key(), "' maps to an invalid file name '", file, "'"));
      weight_map[it.key()] = file;
      if (!opened.count(file)) {
        FM_ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open((fs::path(dir) / file).string()));
        opened[file] = f.get();
        ckpt->files_.push_back(std::move(f));
      }
    }
    for (const auto& [name, file] : weight_map) {
      const auto& ts = opened[file]->tensors();
      auto it = ts.find(name);
      if (it == ts.end())
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is listed in the index but missing from ", file));
      ckpt->index_[name] = &it->second;
    }
    for (const auto& f : ckpt->files_)
      for (const auto& [name, v] : f->tensors())
        if (!weight_map.count(name))
          return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' in ", f->path(), " is not listed in the index"));
  } else {
    FM_ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open((fs::path(dir) / "model.safetensors").string()));
    for (const auto& [name, v] : f->tensors()) ckpt->index_[name] = &v;
    ckpt->files_.push_back(std::move(f));
  }
  return ckpt;
}

const TensorView* Checkpoint::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

int64_t Checkpoint::total_bytes() const {
  int64_t n = 0;
  for (const auto& [name, v] : index_) n += static_cast<int64_t>(v->bytes.size());
  return n;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  for (const auto& [k, v] : metadata) header["__metadata__"][k] = v;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", DTypeName(t.dtype)}, {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
  if (!out) return absl::InternalError(absl::StrCat("write failed: ", path));
  return absl::OkStatus();
}

}  // namespace flashmem::model
