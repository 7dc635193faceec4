// `kiln` commands end to end against a fake coordinator: where the coordinator is found, how
// coordinator errors are printed, exit statuses, the PNG written by generate, progress lines.
#include "cli/commands.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "cli/cluster_state.h"
#include "cli/local_cluster.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cli/fake_coordinator.h"

namespace kiln::cli {
namespace {

using testing::ErrorEnvelope;
using testing::FakeCoordinator;
using ::testing::HasSubstr;
using testing::JobEnvelope;
using ::testing::Not;

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result RunKiln(std::vector<std::string> args, std::map<std::string, std::string> env = {}) {
  std::ostringstream out, err;
  Io io{out, err, [env](const std::string& k) {
          auto it = env.find(k);
          return it == env.end() ? std::string() : it->second;
        }};
  int code = Run(args, io);
  return {code, out.str(), err.str()};
}

std::string TempDir() {
  std::string tmpl = ::testing::TempDir() + "/kiln_cli_cmd_XXXXXX";
  EXPECT_NE(mkdtemp(tmpl.data()), nullptr);
  return tmpl;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

kiln::v1::JobInfo Job(const kiln::v1::JobSpec& spec, kiln::v1::JobState state) {
  kiln::v1::JobInfo job;
  *job.mutable_spec() = spec;
  job.set_state(state);
  job.set_node_id("node-2");
  job.set_attempts(1);
  job.set_total_steps(spec.steps());
  return job;
}

// A coordinator that accepts every job and finishes it with `final_state` at the first Wait,
// after streaming one progress reply per step.
class ScriptedCoordinator {
 public:
  explicit ScriptedCoordinator(kiln::v1::JobState final_state = kiln::v1::JOB_STATE_SUCCEEDED)
      : fake_([this, final_state](const kiln::v1::Envelope& req) {
          std::vector<kiln::v1::Envelope> replies;
          if (req.has_submit()) {
            spec_ = req.submit().spec();
            replies.push_back(JobEnvelope(Job(spec_, kiln::v1::JOB_STATE_QUEUED), true, true));
          } else if (req.has_wait()) {
            for (uint32_t s = 1; req.wait().stream_progress() && s <= spec_.steps(); ++s) {
              auto job = Job(spec_, kiln::v1::JOB_STATE_RUNNING);
              job.set_step(s);
              replies.push_back(JobEnvelope(job, false));
            }
            auto done = Job(spec_, final_state);
            done.set_step(spec_.steps());
            if (final_state == kiln::v1::JOB_STATE_SUCCEEDED) {
              if (req.wait().include_png()) done.set_png("\x89PNG fake image bytes");
              (*done.mutable_packages())["transformer"] = "shared";
              done.mutable_cold_start()->set_fetch_seconds(0.5);
              done.mutable_cold_start()->set_total_seconds(1.5);
            } else {
              done.set_error("out of memory on node-2");
            }
            replies.push_back(JobEnvelope(done, true));
          }
          return replies;
        }) {}
  const std::string& endpoint() const { return fake_.endpoint(); }
  std::vector<kiln::v1::Envelope> requests() { return fake_.requests(); }

 private:
  kiln::v1::JobSpec spec_;
  FakeCoordinator fake_;
};

TEST(Generate, SubmitsWaitsWritesThePngAndPrintsItsPath) {
  ScriptedCoordinator coordinator;
  const std::string out = TempDir() + "/sub/fox.png";
  auto r = RunKiln({"generate", "--coordinator", coordinator.endpoint(), "--prompt", "a fox",
                    "--steps", "4", "--seed", "7", "--job-id", "fox-1", "--out", out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, std::filesystem::path(out).lexically_normal().string() + "\n");
  EXPECT_EQ(ReadFile(out), "\x89PNG fake image bytes");
  // Progress lines (stderr is not a terminal here): queued, then running quarters, then done.
  EXPECT_THAT(r.err, HasSubstr("fox-1: RUNNING on node-2, 1/4 steps"));
  EXPECT_THAT(r.err, HasSubstr("fox-1: SUCCEEDED on node-2, 4/4 steps"));
  auto requests = coordinator.requests();
  ASSERT_GE(requests.size(), 2u);
  const auto& spec = requests[0].submit().spec();
  EXPECT_EQ(spec.job_id(), "fox-1");
  EXPECT_EQ(spec.model(), "flux-tiny");
  EXPECT_EQ(spec.width(), 256u);
  EXPECT_EQ(spec.seed(), 7u);
  EXPECT_TRUE(requests[1].wait().stream_progress());
}

TEST(Generate, JsonReportsTheJob) {
  ScriptedCoordinator coordinator;
  const std::string out = TempDir() + "/fox.png";
  auto r = RunKiln({"generate", "--coordinator", coordinator.endpoint(), "--prompt", "a fox",
                    "--steps", "2", "--out", out, "--json", "--no-progress"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["state"], "SUCCEEDED");
  EXPECT_EQ(j["node_id"], "node-2");
  EXPECT_EQ(j["packages"]["transformer"], "shared");
  EXPECT_DOUBLE_EQ(j["cold_start"]["fetch"].get<double>(), 0.5);
  EXPECT_EQ(j["image"], std::filesystem::path(out).lexically_normal().string());
  EXPECT_THAT(j["job_id"].get<std::string>(), HasSubstr("job-"));  // generated id
}

TEST(Generate, FailedJobExitsThreeAndWritesNothing) {
  ScriptedCoordinator coordinator(kiln::v1::JOB_STATE_FAILED);
  const std::string out = TempDir() + "/fox.png";
  auto r = RunKiln({"generate", "--coordinator", coordinator.endpoint(), "--prompt", "a fox",
                    "--steps", "1", "--out", out});
  EXPECT_EQ(r.code, 3);
  EXPECT_THAT(r.err, HasSubstr("FAILED: out of memory on node-2"));
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(Submit, CoordinatorErrorsPrintCodeFieldAndMessage) {
  FakeCoordinator fake([](const kiln::v1::Envelope&) {
    return std::vector<kiln::v1::Envelope>{
        ErrorEnvelope("INVALID_ARGUMENT", "spec.width", "width 250 is not a multiple of 16")};
  });
  auto r = RunKiln({"submit", "--coordinator", fake.endpoint(), "--prompt", "x", "--width", "250"});
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(r.err,
            "kiln: error: INVALID_ARGUMENT (field spec.width): width 250 is not a multiple of "
            "16\n");
  EXPECT_EQ(r.out, "");
}

TEST(Submit, AFieldNamedInTheMessageIsSaidOnceAndAnyFieldErrorIsBadInput) {
  FakeCoordinator fake([](const kiln::v1::Envelope&) {
    return std::vector<kiln::v1::Envelope>{ErrorEnvelope("FAILED_PRECONDITION", "spec.model",
                                                         "spec.model: no node serves model nope")};
  });
  auto r =
      RunKiln({"submit", "--coordinator", fake.endpoint(), "--prompt", "x", "--model", "nope"});
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(r.err,
            "kiln: error: FAILED_PRECONDITION (field spec.model): no node serves model nope\n");
}

TEST(Status, UnknownJobIsNotFoundAndOtherErrorsAreFailures) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    if (req.status().job_id() == "nope") {
      return std::vector<kiln::v1::Envelope>{ErrorEnvelope("NOT_FOUND", "job_id", "no job 'nope'")};
    }
    return std::vector<kiln::v1::Envelope>{ErrorEnvelope("UNAVAILABLE", "", "shutting down")};
  });
  auto r = RunKiln({"status", "nope", "--coordinator", fake.endpoint()});
  EXPECT_EQ(r.code, kExitNotFound);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND (field job_id): no job 'nope'"));
  r = RunKiln({"status", "other", "--coordinator", fake.endpoint(), "--retry-for", "0"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("kiln: error: UNAVAILABLE: shutting down"));
}

TEST(Coordinator, FoundFromFlagThenEnvThenStateDir) {
  ScriptedCoordinator coordinator;
  const std::string dir = TempDir();
  // Neither flag, env nor cluster.json: a clear error.
  auto r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("no coordinator to talk to"));
  EXPECT_THAT(r.err, HasSubstr("KILN_COORDINATOR"));

  // From the environment.
  r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir},
              {{"KILN_COORDINATOR", coordinator.endpoint()}});
  EXPECT_EQ(r.code, 0) << r.err;

  // From the state directory.
  ClusterState state;
  state.state_dir = dir;
  state.coordinator.client_endpoint = coordinator.endpoint();
  ASSERT_TRUE(SaveClusterState(state).ok());
  r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir, "--job-id", "from-state"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "from-state\n");

  // The flag wins over everything (this endpoint answers nothing).
  r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir, "--coordinator", "tcp://127.0.0.1:1",
               "--request-timeout", "0.3", "--retry-for", "0"},
              {{"KILN_COORDINATOR", coordinator.endpoint()}});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("no coordinator is listening at tcp://127.0.0.1:1"));

  // Every coordinator's endpoint: the first binds nothing (a standby), the second answers; the
  // retry is a note, not an error.
  r = RunKiln({"submit", "--prompt", "x", "--job-id", "via-second", "--coordinator",
               "tcp://127.0.0.1:1," + coordinator.endpoint()});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "via-second\n");
  EXPECT_THAT(r.err, HasSubstr("retrying on " + coordinator.endpoint()));

  // A cluster that is down says so.
  state.state = "down";
  ASSERT_TRUE(SaveClusterState(state).ok());
  r = RunKiln({"nodes", "--state-dir", dir});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is down"));
}

// A local cluster's admin key belongs to that cluster's coordinator only: a secure cluster's
// state left in the default state directory must not make the CLI speak CURVE to another,
// plaintext coordinator named by --coordinator or KILN_COORDINATOR.
TEST(Coordinator, ALocalClustersAdminKeyIsUsedOnlyForItsOwnCoordinator) {
  ScriptedCoordinator plaintext;
  const std::string dir = TempDir();
  ClusterState state;
  state.state_dir = dir;
  state.keys_dir = dir + "/keys";
  state.coordinator.client_endpoint = "tcp://127.0.0.1:1";  // the local cluster's (down)
  ASSERT_TRUE(ProvisionClusterKeys(KeyFiles(state.keys_dir)).ok());
  ASSERT_TRUE(SaveClusterState(state).ok());

  auto r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir, "--job-id", "by-flag",
                    "--coordinator", plaintext.endpoint(), "--request-timeout", "2",
                    "--retry-for", "0"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "by-flag\n");
  EXPECT_THAT(r.err, HasSubstr("its admin key is not used"));
  r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir, "--job-id", "by-env",
               "--request-timeout", "2", "--retry-for", "0"},
              {{"KILN_COORDINATOR", plaintext.endpoint()}});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "by-env\n");

  // Its own coordinator, found in the state or named by the flag, gets the key: CURVE against
  // this plaintext fake fails the handshake, so nothing is answered within the timeout.
  state.coordinator.client_endpoint = plaintext.endpoint();
  ASSERT_TRUE(SaveClusterState(state).ok());
  r = RunKiln({"submit", "--prompt", "x", "--state-dir", dir, "--coordinator",
               plaintext.endpoint(), "--request-timeout", "0.5", "--retry-for", "0"});
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, Not(HasSubstr("its admin key is not used")));
  (void)std::filesystem::remove_all(dir);
}

TEST(Submit, RepeatedJobIdSaysNothingNewWasSubmitted) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    kiln::v1::JobInfo job;
    *job.mutable_spec() = req.submit().spec();
    job.set_state(kiln::v1::JOB_STATE_RUNNING);
    return std::vector<kiln::v1::Envelope>{JobEnvelope(job, true, /*created=*/false)};
  });
  auto r =
      RunKiln({"submit", "--coordinator", fake.endpoint(), "--prompt", "x", "--job-id", "again"});
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out, "again\n");
  EXPECT_THAT(r.err, HasSubstr("already existed"));
  r = RunKiln(
      {"submit", "--coordinator", fake.endpoint(), "--prompt", "x", "--job-id", "again", "--json"});
  EXPECT_EQ(nlohmann::json::parse(r.out)["created"], false);
}

TEST(Nodes, TableAndJson) {
  FakeCoordinator fake([](const kiln::v1::Envelope&) {
    kiln::v1::Envelope env;
    auto* n = env.mutable_nodes()->add_nodes();
    n->mutable_info()->set_node_id("node-1");
    n->mutable_info()->mutable_device()->set_kind("cpu");
    n->set_state(kiln::v1::NODE_STATE_DRAINING);
    n->add_running_jobs("job-9");
    n->set_jobs_done(12);
    return std::vector<kiln::v1::Envelope>{env};
  });
  auto r = RunKiln({"nodes", "--coordinator", fake.endpoint()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("NODE    STATE     DEVICE  RUNNING  QUEUED  DONE  LAST SEEN"));
  EXPECT_THAT(r.out, HasSubstr("node-1  DRAINING  cpu     job-9    0       12    never"));
  r = RunKiln({"nodes", "--coordinator", fake.endpoint(), "--json"});
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["nodes"][0]["state"], "DRAINING");
  EXPECT_EQ(j["nodes"][0]["jobs_done"], 12);
}

TEST(Nodes, UncordonAndRemoveNodeSendTheirRequests) {
  FakeCoordinator fake([](const kiln::v1::Envelope& req) {
    kiln::v1::Envelope env;
    env.set_request_id(req.request_id());
    if (req.has_uncordon()) {
      auto* n = env.mutable_uncordon_reply()->mutable_node();
      n->mutable_info()->set_node_id(req.uncordon().node_id());
      n->set_state(kiln::v1::NODE_STATE_READY);
    } else if (req.has_remove_node() && !req.remove_node().force()) {
      return std::vector<kiln::v1::Envelope>{ErrorEnvelope(
          "FAILED_PRECONDITION", "", "node node-1 is running 1 job(s) (job-9); drain it")};
    } else if (req.has_remove_node()) {
      auto* reply = env.mutable_remove_node_reply();
      reply->mutable_node()->mutable_info()->set_node_id(req.remove_node().node_id());
      reply->mutable_node()->set_state(kiln::v1::NODE_STATE_READY);
      reply->add_requeued_jobs("job-9");
    }
    return std::vector<kiln::v1::Envelope>{env};
  });
  const std::string none = ::testing::TempDir() + "/no-local-cluster";
  auto r = RunKiln({"uncordon", "node-1", "--coordinator", fake.endpoint()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "node-1 READY\n");
  r = RunKiln({"remove-node", "node-1", "--coordinator", fake.endpoint(), "--state-dir", none});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is running 1 job(s) (job-9)"));
  r = RunKiln({"remove-node", "node-1", "--force", "--coordinator", fake.endpoint(),
               "--state-dir", none});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "node-1 removed; requeued job-9\n");
  // Not a local node, and it was live: its process would register again.
  EXPECT_THAT(r.err, HasSubstr("registers again at its next heartbeat"));
  const auto requests = fake.requests();
  ASSERT_EQ(requests.size(), 3u);
  EXPECT_EQ(requests[0].uncordon().node_id(), "node-1");
  EXPECT_FALSE(requests[1].remove_node().force());
  EXPECT_TRUE(requests[2].remove_node().force());
}

TEST(Usage, BadFlagsExitTwoWithoutTalkingToAnyone) {
  auto r = RunKiln({"generate", "--prompt", "x"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--out FILE.png is required"));
  r = RunKiln({"submit", "--width", "-16"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--width: -16 is outside"));
  r = RunKiln({});
  EXPECT_EQ(r.code, 2);
  r = RunKiln({"help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("generate"));
  r = RunKiln({"up"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--models NAME=DIR is required"));
}

TEST(Usage, UpRefusesGpusThatDoNotMakeWholeNodes) {
  std::string model = ::testing::TempDir() + "/kiln_up_usage_model_XXXXXX";
  ASSERT_NE(mkdtemp(model.data()), nullptr);
  std::ofstream(model + "/model_index.json") << "{}\n";
  const std::string models = "flux-tiny=" + model;
  auto r = RunKiln({"up", "--models", models, "--gpus-per-node", "0"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--gpus-per-node: 0 is outside"));
  r = RunKiln({"up", "--models", models, "--device", "cuda", "--gpus", "0,1,2",
               "--gpus-per-node", "2"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("gpus: 3 GPUs do not make whole nodes of 2 (--gpus-per-node)"));
}

// `kiln add-node` in a cluster started with `--gpus 0,1,2,3 --gpus-per-node 2`: refused (exit 2,
// before anything starts) without --gpus of its own or with the wrong number of them.
TEST(Usage, AddNodeInAGpuClusterNeedsItsOwnGpus) {
  const std::string dir = TempDir();
  ClusterState state;
  state.state_dir = dir;
  state.device = "cuda";
  state.gpus_per_node = 2;
  state.nodes.resize(2);
  state.nodes[0].node_id = "node-1";
  state.nodes[0].gpu = "0,1";
  state.nodes[1].node_id = "node-2";
  state.nodes[1].gpu = "2,3";
  ASSERT_TRUE(SaveClusterState(state).ok());
  auto r = RunKiln({"add-node", "--state-dir", dir});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("gives each node its GPUs"));
  EXPECT_THAT(r.err, HasSubstr("name the new node's 2 GPUs with --gpus"));
  r = RunKiln({"add-node", "--state-dir", dir, "--gpus", "4"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("gpus: 1 GPUs named; each node of this cluster has 2 GPUs"));
  r = RunKiln({"add-node", "--state-dir", dir, "--gpus", ","});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--gpus: empty list"));
}

TEST(Usage, LogFormatIsAGlobalOptionBeforeTheCommand) {
  auto r = RunKiln({"--log-format", "json", "help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("generate"));
  r = RunKiln({"--log_format=text", "help"});
  EXPECT_EQ(r.code, 0);
  r = RunKiln({"--log-format", "yaml", "help"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--log_format: 'yaml' is not one of text, json"));
  r = RunKiln({"--log-format"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--log-format: needs text or json"));
}

TEST(Down, WithoutAClusterSaysSo) {
  auto r = RunKiln({"down", "--state-dir", TempDir()});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("no local cluster in"));
}

}  // namespace
}  // namespace kiln::cli
