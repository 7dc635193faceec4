// Experiment (issue 15, item 2), the C++ half: run the package that bench/sp/aoti_all_to_all.py
// wrote (a block with _c10d_functional.all_to_all_single) from LibTorch alone, as kiln's nodes
// run packages (torch::inductor::AOTIModelPackageLoader).
//
// The package names its process group by the string baked in at export ("0", Python's WORLD)
// and the op resolves that name through c10d's group registry at run time, so the process must
// make a group and register it under that name first. A real multi-rank group needs a backend's
// header: ProcessGroupGloo.hpp includes <gloo/...>, which the pip wheel does not ship (nor
// NCCL's nccl.h, which comes with CUDA), and c10d's FakeProcessGroup.hpp includes Python.h. This
// run is therefore one rank: a c10d::ProcessGroup whose CPU backend is OneRank below (an
// all-to-all over one rank is a copy, the exact answer for a world of one). It shows the package
// runs outside Python, finds the op through the proxy executor and the group by name, and what
// happens when no group is registered.
//
// Build (not part of the CMake tree; T = the venv's torch directory):
//   g++ -std=c++17 -I$T/include -I$T/include/torch/csrc/api/include bench/sp/aoti_all_to_all_run.cc \
//       -o /tmp/aoti_a2a_run -L$T/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$T/lib
// Usage: aoti_all_to_all_run DIR   (DIR: the Python script's output for WORLD = 1: block.pt2,
// rank0.in.f32, rank0.want.f32)
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

at::Tensor ReadF32(const std::string& path, std::vector<int64_t> shape) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto t = torch::empty(shape, torch::kFloat32);
  TORCH_CHECK(bytes.size() == static_cast<size_t>(t.nbytes()), path, ": ", bytes.size(),
              " bytes, want ", t.nbytes());
  std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

// A backend for a world of one: the all-to-all copies, done at once.
class DoneWork : public c10d::Work {
 public:
  bool wait(std::chrono::milliseconds) override { return true; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override {
    auto f = c10::make_intrusive<c10::ivalue::Future>(c10::NoneType::get());
    f->markCompleted();
    return f;
  }
};

class OneRank : public c10d::Backend {
 public:
  OneRank() : c10d::Backend(/*rank=*/0, /*size=*/1) {}
  const std::string getBackendName() const override { return "one-rank"; }
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& out, at::Tensor& in,
                                               std::vector<int64_t>&, std::vector<int64_t>&,
                                               const c10d::AllToAllOptions&) override {
    out.copy_(in);
    return c10::make_intrusive<DoneWork>();
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  torch::inductor::AOTIModelPackageLoader loader(dir + "/block.pt2", "model");
  auto x = ReadF32(dir + "/rank0.in.f32", {4, 8});
  auto want = ReadF32(dir + "/rank0.want.f32", {4, 8});

  try {  // no group registered under "0"
    loader.run({x});
    std::printf("[c++] without a registered group: ran (unexpected)\n");
    return 1;
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::printf("[c++] without a registered group: refused: %s\n",
                what.substr(0, what.find('\n')).c_str());
  }

  auto pg = c10::make_intrusive<c10d::ProcessGroup>(/*rank=*/0, /*size=*/1);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM,
                 c10::make_intrusive<OneRank>());
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  c10d::register_process_group("0", pg);
  auto got = loader.run({x});
  double err = (got.at(0) - want).abs().max().item<double>();
  std::printf("[c++] with group '0' registered: ran; max|package - eager| = %.3e\n", err);
  c10d::unregister_process_group("0");
  return err < 1e-5 ? 0 : 1;
}
