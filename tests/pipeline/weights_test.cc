// ComponentWeights::Gather without a compiled package: load-time derived constants (concat0,
// fp8_rowwise, fp8_rowwise_scale) against kiln.models.quant's Python results byte for byte,
// their cache, and every error (missing source named, misshaped result, op/dtype mismatch,
// unknown op, sources that do not concatenate, undescribed FQN); plus the manifest's "derive"
// parsing. Fixtures come from tests/pipeline/ref_derive.py. The CUDA case runs where a GPU is
// visible (it checks that a GPU node quantizes to the same bytes) and skips elsewhere.
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>

#include "cache/package.h"
#include "gtest/gtest.h"
#include "pipeline/aoti_package.h"
#include "pipeline/torch_error.h"
#include "pipeline/weights.h"
#include "tests/pipeline/test_support.h"

namespace kiln::pipeline {
namespace {

using kiln::testing::HavePython;
using kiln::testing::ReadFileOrDie;
using kiln::testing::RunPython;

// A manifest around `constants` (the manifest's "constants" object), parsed as the runtime does.
absl::StatusOr<cache::PackageManifest> Manifest(const nlohmann::json& constants) {
  cache::ArtifactKey key;
  key.architecture = std::string(64, 'a');
  key.component = "transformer";
  key.precision = "fp8";
  key.bucket = {1, 256, 256, 512};
  key.compile = std::string(64, 'c');
  key.target = "cuda:sm_90";
  key.toolchain.torch = "2.13.0";
  key.toolchain.kiln = cache::BuildKilnRevision();
  nlohmann::json j = {{"format", 1},
                      {"digest", key.Digest()},
                      {"key", key.ToJson()},
                      {"package", {{"file", "model.pt2"}, {"sha256", "0"}, {"bytes", 1}}},
                      {"constants", constants},
                      {"inputs", nlohmann::json::array()},
                      {"outputs", nlohmann::json::array()}};
  return cache::PackageManifest::FromJson(j);
}

std::vector<std::string> Keys(const nlohmann::json& constants) {
  std::vector<std::string> out;
  for (const auto& [k, v] : constants.items()) out.push_back(k);
  return out;
}

// Same dtype, shape and bytes.
void ExpectIdentical(const std::string& name, const at::Tensor& got, const at::Tensor& want) {
  at::Tensor g = got.cpu().contiguous();
  ASSERT_EQ(g.scalar_type(), want.scalar_type()) << name;
  ASSERT_EQ(g.sizes(), want.sizes()) << name;
  EXPECT_EQ(std::memcmp(g.data_ptr(), want.data_ptr(), want.nbytes()), 0)
      << name << ": bytes differ from Python's";
}

class WeightsTest : public ::testing::Test {
 protected:
  // The fixtures are made once for the suite (one Python start).
  static void SetUpTestSuite() {
    if (!HavePython()) return;
    tmp_ = std::make_unique<kiln::testing::TempDir>();
    auto py = RunPython("tests/pipeline/ref_derive.py", {tmp_->path()});
    if (!py.ok()) {
      setup_error_ = py.status().ToString();
      return;
    }
    constants_ = nlohmann::json::parse(ReadFileOrDie(tmp_->Join("constants.json")));
    auto expected = SafetensorsFile::Open(tmp_->Join("expected.safetensors"));
    if (!expected.ok()) {
      setup_error_ = expected.status().ToString();
      return;
    }
    expected_ = *std::move(expected);
  }
  static void TearDownTestSuite() {
    expected_.reset();
    tmp_.reset();
  }

  void SetUp() override {
    if (!HavePython()) GTEST_SKIP() << "needs KILN_PYTHON and KILN_SOURCE (run via ctest)";
    ASSERT_TRUE(setup_error_.empty()) << setup_error_;
  }

  absl::StatusOr<std::unique_ptr<ComponentWeights>> Open(const c10::Device& device) {
    return ComponentWeights::Open(tmp_->Join("ckpt"), "model", device);
  }

  at::Tensor Expected(const std::string& name) {
    const TensorView* v = expected_->Find(name);
    EXPECT_NE(v, nullptr) << name;
    return v == nullptr ? at::Tensor() : TensorFromView(*v)->clone();
  }

  // Gather of `constants` with one spec edited by `edit`; returns the status.
  absl::Status GatherEdited(const std::string& fqn,
                            const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json c = constants_;
    edit(c[fqn]);
    auto m = Manifest(c);
    if (!m.ok()) return m.status();
    auto w = Open(c10::kCPU);
    if (!w.ok()) return w.status();
    return (*w)->Gather({fqn}, *m, "").status();
  }

  void ExpectMatchesPython(const c10::Device& device) {
    auto m = Manifest(constants_);
    ASSERT_TRUE(m.ok()) << m.status();
    auto w = Open(device);
    ASSERT_TRUE(w.ok()) << w.status();
    auto got = (*w)->Gather(Keys(constants_), *m, "");
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), constants_.size());
    for (const auto& [name, t] : *got) {
      EXPECT_EQ(t.device().type(), device.type()) << name;
      EXPECT_TRUE(t.is_contiguous()) << name;
      ExpectIdentical(name, t, Expected(name));
    }
  }

  static inline std::unique_ptr<kiln::testing::TempDir> tmp_;
  static inline nlohmann::json constants_;
  static inline std::unique_ptr<SafetensorsFile> expected_;
  static inline std::string setup_error_;
};

TEST_F(WeightsTest, ManifestCarriesDerivations) {
  auto m = Manifest(constants_);
  ASSERT_TRUE(m.ok()) << m.status();
  const auto& fused = m->constants.at("attn.to_qkv.weight");
  EXPECT_EQ(fused.derive.op, "fp8_rowwise");
  EXPECT_EQ(fused.derive.sources,
            (std::vector<std::string>{"attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"}));
  EXPECT_EQ(fused.dtype, "float8_e4m3fn");
  EXPECT_EQ(fused.source, "checkpoint");
  // A constant without "derive" (every constant of older manifests) is the checkpoint tensor.
  EXPECT_TRUE(m->constants.at("attn.to_k.bias").derive.op.empty());
  EXPECT_TRUE(m->constants.at("attn.to_k.bias").derive.sources.empty());

  for (const auto& bad : {nlohmann::json{{"op", "concat0"}, {"from", nlohmann::json::array()}},
                          nlohmann::json{{"op", ""}, {"from", {"attn.to_q.weight"}}},
                          nlohmann::json{{"op", "concat0"}, {"from", "attn.to_q.weight"}},
                          nlohmann::json{{"from", {"attn.to_q.weight"}}}}) {
    nlohmann::json c = constants_;
    c["attn.fused_f32.weight"]["derive"] = bad;
    auto r = Manifest(c);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad.dump();
  }
  nlohmann::json c = constants_;
  c["attn.fused_f32.weight"]["source"] = "package";
  auto r = Manifest(c);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST_F(WeightsTest, DerivedConstantsEqualPythonByteForByte) { ExpectMatchesPython(c10::kCPU); }

TEST_F(WeightsTest, DerivedConstantsEqualPythonByteForByteOnCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  ExpectMatchesPython(c10::Device(c10::kCUDA, 0));
}

TEST_F(WeightsTest, DerivedConstantsAreCachedAndShared) {
  auto m = Manifest(constants_);
  ASSERT_TRUE(m.ok()) << m.status();
  auto w = Open(c10::kCPU);
  ASSERT_TRUE(w.ok()) << w.status();
  auto first = (*w)->Gather({"attn.to_qkv.weight"}, *m, "");
  ASSERT_TRUE(first.ok()) << first.status();
  const uint64_t read = (*w)->bytes_read();
  EXPECT_EQ(read, 32 * 48 * 4 + 16 * 48 * 2 + 16 * 48 * 2);  // q f32, k bf16, v f16
  // The scale comes with the weight (one quantization); a second package gets the same tensors.
  auto second = (*w)->Gather({"attn.to_qkv.weight_scale", "attn.to_qkv.weight"}, *m, "");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*w)->bytes_read(), read);
  EXPECT_EQ(second->at("attn.to_qkv.weight").data_ptr(),
            first->at("attn.to_qkv.weight").data_ptr());
  ExpectIdentical("attn.to_qkv.weight_scale", second->at("attn.to_qkv.weight_scale"),
                  Expected("attn.to_qkv.weight_scale"));
}

// The checkpoint's tensors handed over in memory (a rank of a multi-GPU node gets them from
// rank 0's broadcast): the same constants as from the file, nothing read, a plain constant of
// the checkpoint's dtype the tensor itself, one of another dtype a converted copy, a missing
// one named with the tensors' origin, and checkpoint() describing them as the file does.
TEST_F(WeightsTest, TensorsInMemoryGiveWhatTheCheckpointGives) {
  auto set = WeightSet::OpenDir(tmp_->Join("ckpt"), "model");
  ASSERT_TRUE(set.ok()) << set.status();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& name : (*set)->names()) {
    tensors.emplace_back(name, TensorFromView(*(*set)->Find(name))->clone());
  }
  at::Tensor k_bias;
  for (const auto& [name, t] : tensors) {
    if (name == "attn.to_k.bias") k_bias = t;
  }
  ASSERT_TRUE(k_bias.defined());
  ASSERT_EQ(k_bias.scalar_type(), at::kBFloat16);
  auto held = ComponentWeights::FromTensors(tensors, c10::kCPU, "the tensors of this test");
  ASSERT_TRUE(held.ok()) << held.status();
  ComponentWeights* w = held->get();
  auto m = Manifest(constants_);
  ASSERT_TRUE(m.ok()) << m.status();
  auto got = w->Gather(Keys(constants_), *m, "");
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), constants_.size());
  for (const auto& [name, t] : *got) {
    if (constants_[name].contains("derive")) ExpectIdentical(name, t, Expected(name));
  }
  EXPECT_EQ(w->bytes_read(), 0u);
  // The description LoRA files are checked against: the checkpoint's names, dtypes, shapes.
  EXPECT_EQ(w->checkpoint().names(), (*set)->names());
  for (const auto& name : (*set)->names()) {
    EXPECT_EQ(w->checkpoint().Find(name)->shape, (*set)->Find(name)->shape) << name;
    EXPECT_EQ(w->checkpoint().Find(name)->dtype, (*set)->Find(name)->dtype) << name;
  }
  EXPECT_EQ(got->at("attn.to_k.bias").data_ptr(), k_bias.data_ptr());
  nlohmann::json c = constants_;
  c["attn.to_k.bias"]["dtype"] = "float32";
  c["attn.nope.bias"] = {{"shape", {16}}, {"dtype", "float32"}, {"source", "checkpoint"}};
  auto edited = Manifest(c);
  ASSERT_TRUE(edited.ok()) << edited.status();
  auto converted = w->Gather({"attn.to_k.bias"}, *edited, "");
  ASSERT_TRUE(converted.ok()) << converted.status();
  EXPECT_EQ(converted->at("attn.to_k.bias").scalar_type(), at::kFloat);
  EXPECT_TRUE(converted->at("attn.to_k.bias").equal(k_bias.to(at::kFloat)));
  auto missing = w->Gather({"attn.nope.bias"}, *edited, "");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_NE(missing.status().message().find("missing from the tensors of this test: "
                                            "attn.nope.bias"),
            std::string::npos)
      << missing.status();
}

TEST_F(WeightsTest, MissingSourceIsNamedWithTheConstantThatNeedsIt) {
  auto s = GatherEdited("attn.to_qkv.weight", [](nlohmann::json& spec) {
    spec["derive"]["from"] = {"attn.to_q.weight", "attn.nope.weight", "attn.to_v.weight"};
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find("attn.nope.weight (for attn.to_qkv.weight)"), std::string::npos) << s;
}

TEST_F(WeightsTest, ResultShapeIsCheckedAgainstTheManifest) {
  auto s = GatherEdited("attn.to_qkv.bias",
                        [](nlohmann::json& spec) { spec["shape"] = {48}; });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("shape [64], the package expects [48]"), std::string::npos) << s;
}

TEST_F(WeightsTest, OpAndDtypeMustAgree) {
  auto s = GatherEdited("attn.to_q.weight",
                        [](nlohmann::json& spec) { spec["dtype"] = "bfloat16"; });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("fp8_rowwise makes float8_e4m3fn"), std::string::npos) << s;
  s = GatherEdited("attn.to_q.weight_scale",
                   [](nlohmann::json& spec) { spec["dtype"] = "bfloat16"; });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST_F(WeightsTest, UnknownOpIsUnimplemented) {
  auto s = GatherEdited("attn.fused_f32.weight",
                        [](nlohmann::json& spec) { spec["derive"]["op"] = "int4_groupwise"; });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  EXPECT_NE(s.message().find("int4_groupwise"), std::string::npos) << s;
}

TEST_F(WeightsTest, SourcesThatDoNotConcatenateAreRefused) {
  // A weight and a bias: different ranks.
  auto s = GatherEdited("attn.fused_f32.weight", [](nlohmann::json& spec) {
    spec["derive"]["from"] = {"attn.to_q.weight", "attn.to_k.bias"};
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("attn.to_k.bias"), std::string::npos) << s;
  // fp8 of vectors.
  s = GatherEdited("attn.to_qkv.weight_scale", [](nlohmann::json& spec) {
    spec["derive"]["from"] = {"attn.to_q.bias"};
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("needs matrices"), std::string::npos) << s;
}

TEST_F(WeightsTest, UndescribedFqnIsDataLoss) {
  auto m = Manifest(constants_);
  ASSERT_TRUE(m.ok()) << m.status();
  auto w = Open(c10::kCPU);
  ASSERT_TRUE(w.ok()) << w.status();
  auto r = (*w)->Gather({"attn.to_out.0.weight"}, *m, "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
}

// A LibTorch error becomes its message without the C++ backtrace c10::Error's what() carries
// (statuses are cut to their tail, which then showed only frames); other exceptions unchanged.
TEST(ExceptionMessageTest, LibTorchErrorsLoseTheirBacktrace) {
  try {
    (void)at::cat({torch::zeros({2, 3}), torch::zeros({3})}, 0);
    FAIL() << "at::cat of a matrix and a vector did not throw";
  } catch (const std::exception& e) {
    const std::string full = e.what();
    const std::string message = kiln::pipeline::ExceptionMessage(e);
    EXPECT_FALSE(message.empty());
    EXPECT_EQ(full.rfind(message, 0), 0u) << "not the start of what(): " << message;
    EXPECT_EQ(message.find("frame #"), std::string::npos) << message;
    EXPECT_EQ(message.find("Exception raised from"), std::string::npos) << message;
  }
  EXPECT_EQ(kiln::pipeline::ExceptionMessage(std::runtime_error("disk full")), "disk full");
}

// WriteSafetensors (the canary's file, written by kiln-canary) reads back through kiln's own
// reader with every dtype, shape and byte it wrote, non-contiguous inputs included.
TEST(WriteSafetensorsTest, ReadsBackByteForByte) {
  kiln::testing::TempDir dir;
  const std::string path = dir.path() + "/t.safetensors";
  std::vector<std::pair<std::string, at::Tensor>> written = {
      {"output.0", torch::randn({3, 5}).to(torch::kBFloat16)},
      {"input.0", torch::arange(7, torch::kLong)},
      {"q", torch::randn({4, 2}).t().to(torch::kFloat8_e4m3fn)},  // transposed: not contiguous
      {"scalar", torch::tensor(2.5f).reshape({})},
  };
  ASSERT_TRUE(WriteSafetensors(path, written).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const auto& [name, tensor] : written) {
    const TensorView* view = (*file)->Find(name);
    ASSERT_NE(view, nullptr) << name;
    auto back = TensorFromView(*view);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->scalar_type(), tensor.scalar_type()) << name;
    EXPECT_EQ(back->sizes(), tensor.sizes()) << name;
    at::Tensor want = tensor.contiguous();
    ASSERT_EQ(back->numel() * back->element_size(), want.numel() * want.element_size());
    EXPECT_EQ(std::memcmp(back->data_ptr(), want.data_ptr(), want.numel() * want.element_size()), 0)
        << name;
  }
}

TEST(WriteSafetensorsTest, UnnamedDtypeIsRefusedNamingTheTensor) {
  kiln::testing::TempDir dir;
  auto s = WriteSafetensors(dir.path() + "/t.safetensors",
                            {{"z", torch::zeros({2}, torch::kComplexFloat)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  EXPECT_NE(s.message().find("z"), std::string::npos) << s;
}

}  // namespace
}  // namespace kiln::pipeline
