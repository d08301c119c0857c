// The safetensors reader and checkpoint loader against hostile files: each case must give an
// absl::Status that names the tensor (or the file), never a crash.
#include "worker/model/safetensors.h"

#include <filesystem>
#include <fstream>

#include <omp.h>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "nlohmann/json.hpp"
#include "tests/model/test_models.h"
#include "worker/model/weights.h"

namespace flashmem::model {
namespace {

using flashmem::testing::ReadAll;
using flashmem::testing::SmallVocabTiny;
using flashmem::testing::TempDir;
using flashmem::testing::WriteModel;

std::string WriteRaw(const std::string& dir, const std::string& name, const std::string& header,
                     size_t data_bytes, int64_t header_len_override = -1) {
  const std::string path = dir + "/" + name;
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header_len_override >= 0 ? static_cast<uint64_t>(header_len_override) : header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  std::string data(data_bytes, '\x01');
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  return path;
}

void ExpectError(const absl::StatusOr<std::unique_ptr<SafetensorsFile>>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected an error containing: " << needle;
  EXPECT_NE(std::string(r.status().message()).find(needle), std::string::npos) << r.status().message();
}

// Removes a test's directory when the test ends, passed or not.
struct RemovedAtExit {
  std::string dir;
  ~RemovedAtExit() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

TEST(Safetensors, ReadsWhatItWrites) {
  const std::string dir = TempDir("st_rw");
  const RemovedAtExit cleanup{dir};
  std::vector<TensorToWrite> t = {{"a", DType::kF32, {2, 2}, std::vector<uint8_t>(16, 0)},
                                  {"b", DType::kBF16, {3}, std::vector<uint8_t>(6, 1)},
                                  {"c", DType::kI64, {1}, std::vector<uint8_t>(8, 2)}};
  ASSERT_TRUE(WriteSafetensors(dir + "/x.safetensors", t).ok());
  auto f = SafetensorsFile::Open(dir + "/x.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ((*f)->tensors().size(), 3u);
  const TensorView& b = (*f)->tensors().at("b");
  EXPECT_EQ(b.dtype, DType::kBF16);
  EXPECT_EQ(b.shape, std::vector<int64_t>{3});
  EXPECT_EQ(b.bytes.size(), 6u);
  EXPECT_EQ(b.bytes[0], 1);
}

TEST(Safetensors, HostileFiles) {
  const std::string dir = TempDir("st_hostile");
  const RemovedAtExit cleanup{dir};
  {  // truncated: shorter than the header length field
    std::ofstream(dir + "/t.safetensors", std::ios::binary) << "abc";
    ExpectError(SafetensorsFile::Open(dir + "/t.safetensors"), "truncated");
  }
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "h.st", "{}", 0, 1000)), "header length 1000 runs past the end");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "huge.st", "{}", 0, int64_t{1} << 62)), "runs past the end");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "u.st", "{\"a\xff\": 1}", 0)), "not valid UTF-8");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "j.st", "{\"a\": ", 0)), "not valid JSON");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "o.st",
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12)),
      "tensor 'y': data overlaps tensor 'x'");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "r.st",
      R"({"x":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}})", 16)), "tensor 'x': data_offsets [0, 1000] out of range");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "s.st",
      R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)), "tensor 'x': holds 8 bytes but F32 [3] needs 12");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "d.st",
      R"({"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8)), "tensor 'x': unsupported dtype 'C64'");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "n.st",
      R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)), "tensor 'x': shape [-1]");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "b.st",
      R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8)), "tensor 'x': data_offsets [8, 4] out of range");
  ExpectError(SafetensorsFile::Open(WriteRaw(dir, "m.st",
      R"({"x":{"shape":[1],"data_offsets":[0,4]}})", 4)), "tensor 'x': missing string 'dtype'");
  ExpectError(SafetensorsFile::Open(dir + "/does-not-exist"), "cannot open");
}

// Checkpoint-level checks against the config: run on a real (small) random checkpoint.
class CheckpointHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    args_ = SmallVocabTiny(3);
    dir_ = WriteModel(args_, "ckpt_hostile");
    tensors_ = ReadAll(dir_ + "/model.safetensors");
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  absl::Status LoadWith(const std::vector<TensorToWrite>& t) {
    EXPECT_TRUE(WriteSafetensors(dir_ + "/model.safetensors", t).ok());
    auto ckpt = Checkpoint::Open(dir_);
    if (!ckpt.ok()) return ckpt.status();
    return LoadWeights(**ckpt, args_).status();
  }
  TensorToWrite* Find(std::vector<TensorToWrite>& t, const std::string& name) {
    for (auto& x : t) if (x.name == name) return &x;
    ADD_FAILURE() << "no tensor " << name;
    return nullptr;
  }
  ModelArgs args_;
  std::string dir_;
  std::vector<TensorToWrite> tensors_;
};

void ExpectStatus(const absl::Status& st, const std::string& needle) {
  ASSERT_FALSE(st.ok()) << "expected: " << needle;
  EXPECT_NE(std::string(st.message()).find(needle), std::string::npos) << st.message();
}

TEST_F(CheckpointHostile, IntactCheckpointLoads) { EXPECT_TRUE(LoadWith(tensors_).ok()); }

TEST_F(CheckpointHostile, MissingTensor) {
  auto t = tensors_;
  t.erase(std::remove_if(t.begin(), t.end(), [](auto& x) { return x.name == "layers.1.attn.wkv.scale"; }), t.end());
  ExpectStatus(LoadWith(t), "missing tensor 'layers.1.attn.wkv.scale'");
}

TEST_F(CheckpointHostile, ExtraTensor) {
  auto t = tensors_;
  t.push_back({"layers.0.attn.surprise", DType::kF32, {1}, std::vector<uint8_t>(4, 0)});
  ExpectStatus(LoadWith(t), "unexpected tensor 'layers.0.attn.surprise'");
}

TEST_F(CheckpointHostile, WrongDtype) {
  auto t = tensors_;
  TensorToWrite* x = Find(t, "layers.2.ffn.experts.1.w2.weight");  // I8 packed FP4
  x->dtype = DType::kF8E4M3;
  ExpectStatus(LoadWith(t), "tensor 'layers.2.ffn.experts.1.w2.weight' has dtype F8_E4M3, expected I8");
}

TEST_F(CheckpointHostile, WrongShape) {
  auto t = tensors_;
  TensorToWrite* x = Find(t, "layers.1.attn.attn_sink");
  x->shape = {2, 2};
  ExpectStatus(LoadWith(t), "tensor 'layers.1.attn.attn_sink' has shape [2, 2], expected [4]");
}

TEST_F(CheckpointHostile, NanE8m0ScaleIsRejectedAtLoad) {
  auto t = tensors_;
  Find(t, "layers.1.attn.wq_b.scale")->bytes[3] = 0xff;
  ExpectStatus(LoadWith(t), "tensor 'layers.1.attn.wq_b.scale': E8M0 byte 255 (NaN)");
  t = tensors_;
  Find(t, "layers.0.ffn.experts.0.w1.scale")->bytes[0] = 0xff;
  ExpectStatus(LoadWith(t), "tensor 'layers.0.ffn.experts.0.w1.scale': E8M0 byte 255 (NaN)");
}

TEST_F(CheckpointHostile, NanE4m3WeightIsRejected) {
  auto t = tensors_;
  Find(t, "layers.0.attn.wkv.weight")->bytes[10] = 0x7f;
  ExpectStatus(LoadWith(t), "tensor 'layers.0.attn.wkv.weight': NaN e4m3 code");
}

TEST_F(CheckpointHostile, LayersPastAFailedOneAreNotDecoded) {
  // One thread: the layers run in order, so every layer after the failing first one is skipped
  // (and not reported as done); the first layer's error comes back. Intact, every layer is done.
  auto t = tensors_;
  Find(t, "layers.0.attn.wkv.weight")->bytes[10] = 0x7f;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  auto load = [&](const std::vector<TensorToWrite>& with, std::vector<int64_t>* done) {
    EXPECT_TRUE(WriteSafetensors(dir_ + "/model.safetensors", with).ok());
    auto ckpt = Checkpoint::Open(dir_);
    if (!ckpt.ok()) return ckpt.status();
    return LoadWeights(**ckpt, args_, {}, [&](int64_t d, int64_t) { done->push_back(d); }).status();
  };
  std::vector<int64_t> failed_done, intact_done;
  const absl::Status failed = load(t, &failed_done), intact = load(tensors_, &intact_done);
  omp_set_num_threads(threads);
  ExpectStatus(failed, "tensor 'layers.0.attn.wkv.weight': NaN e4m3 code");
  EXPECT_TRUE(failed_done.empty()) << failed_done.size() << " layers reported done after layer 0 failed";
  EXPECT_TRUE(intact.ok()) << intact;
  EXPECT_EQ(intact_done.size(), static_cast<size_t>(args_.n_layers + args_.n_mtp_layers));
}

TEST_F(CheckpointHostile, OutOfRangeHashRoute) {
  auto t = tensors_;
  TensorToWrite* x = Find(t, "layers.0.ffn.gate.tid2eid");
  const int64_t bad = 99;
  std::memcpy(x->bytes.data() + 16, &bad, 8);
  ExpectStatus(LoadWith(t), "tensor 'layers.0.ffn.gate.tid2eid': expert id 99");
}

TEST_F(CheckpointHostile, ShardedCheckpointThroughIndex) {
  // Split into two shard files listed by model.safetensors.index.json.
  std::vector<TensorToWrite> a(tensors_.begin(), tensors_.begin() + tensors_.size() / 2);
  std::vector<TensorToWrite> b(tensors_.begin() + tensors_.size() / 2, tensors_.end());
  std::filesystem::remove(dir_ + "/model.safetensors");
  ASSERT_TRUE(WriteSafetensors(dir_ + "/model-00001-of-00002.safetensors", a).ok());
  ASSERT_TRUE(WriteSafetensors(dir_ + "/model-00002-of-00002.safetensors", b).ok());
  nlohmann::json idx;
  for (auto& x : a) idx["weight_map"][x.name] = "model-00001-of-00002.safetensors";
  for (auto& x : b) idx["weight_map"][x.name] = "model-00002-of-00002.safetensors";
  std::ofstream(dir_ + "/model.safetensors.index.json") << idx.dump();
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE(LoadWeights(**ckpt, args_).ok());
  // A tensor listed in the index but missing from its shard; a path escaping the directory.
  idx["weight_map"]["layers.9.ghost"] = "model-00001-of-00002.safetensors";
  std::ofstream(dir_ + "/model.safetensors.index.json") << idx.dump();
  ExpectStatus(Checkpoint::Open(dir_).status(), "tensor 'layers.9.ghost' is listed in the index but missing");
  idx["weight_map"].erase("layers.9.ghost");
  idx["weight_map"]["embed.weight"] = "../model-00001-of-00002.safetensors";
  std::ofstream(dir_ + "/model.safetensors.index.json") << idx.dump();
  ExpectStatus(Checkpoint::Open(dir_).status(), "invalid file name");
}

TEST_F(CheckpointHostile, TensorParallelShardsSplitAsSpec7) {
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok());
  auto full = LoadWeights(**ckpt, args_);
  auto r1 = LoadWeights(**ckpt, args_, ShardSpec{1, 2});
  ASSERT_TRUE(full.ok() && r1.ok()) << r1.status();
  const auto& f = full->layers[1].attn;
  const auto& h = r1->layers[1].attn;
  EXPECT_EQ(h.wq_b.rows, f.wq_b.rows / 2);       // heads split
  EXPECT_EQ(h.attn_sink.size(), f.attn_sink.size() / 2);
  EXPECT_EQ(h.attn_sink[0], f.attn_sink[2]);     // rank 1 holds heads 2..3
  EXPECT_EQ(h.wo_a.rows, f.wo_a.rows / 2);       // groups split
  EXPECT_EQ(h.wo_b.cols, f.wo_b.cols / 2);       // row-parallel input
  EXPECT_EQ(h.wo_b.values[0], f.wo_b.values[f.wo_b.cols / 2]);
  EXPECT_EQ(h.indexer->wq_b.rows, f.indexer->wq_b.rows / 2);
  EXPECT_EQ(r1->layers[1].ffn.experts.size(), full->layers[1].ffn.experts.size() / 2);
  EXPECT_EQ(r1->layers[1].ffn.first_local_expert, args_.n_routed_experts / 2);
  EXPECT_EQ(r1->embed.rows, full->embed.rows / 2);
  EXPECT_EQ(r1->head.rows, full->head.rows / 2);
  EXPECT_FALSE(LoadWeights(**ckpt, args_, ShardSpec{0, 3}).ok());  // 3 does not divide 4 heads
  EXPECT_FALSE(LoadWeights(**ckpt, args_, ShardSpec{2, 2}).ok());
}

}  // namespace
}  // namespace flashmem::model
