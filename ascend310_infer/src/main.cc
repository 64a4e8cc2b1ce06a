/**
 * DELF / DELG on Ascend 310: runs the exported network once over the pyramid-level files in
 * --input_path (src/ascend310/preprocess.py) and writes every output (attention and local
 * descriptor maps; DELG's raw global descriptor too) for src/ascend310/postprocess.py (the
 * protocol of src/ascend310/protocol.py, see inc/utils.h).
 * Exit status: 0; 1 when some input files failed (one "error: <file>: ..." line each on stderr,
 * the others are run); 2 when it cannot run at all (usage, unreadable MindIR, unwritable output).
 *
 * Model for an H x W input: <prefix>_<H>x<W>.mindir when export.py --input_shape static wrote
 * it, else the dynamic <prefix>.mindir built with its input fixed to 1x3xHxW (one build per
 * distinct shape, so use preprocess --input_mode canvas here: a few shapes, not one per image;
 * DELG has no static export, so its dynamic model is built for every level size it meets).
 *
 * Usage: main --mindir_path=DELF_MindIR.mindir --input_path=WORK/inputs --output_path=WORK/outputs
 *             [--device_id=0]
 */
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/serialization.h"
#include "include/api/types.h"
#include "inc/utils.h"

namespace {

struct Options {
  std::string mindir_path;
  std::string input_path;
  std::string output_path;
  uint32_t device_id = 0;
};

const char kUsage[] =
    "usage: main --mindir_path=DELF_MindIR.mindir --input_path=DIR --output_path=DIR [--device_id=0]\n";

// Accepts --name=value and --name value.
bool ParseArgs(int argc, char **argv, Options *options, std::string *error) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      *error = "";
      return false;
    }
    if (arg.rfind("--", 0) != 0) {
      *error = "unexpected argument " + arg;
      return false;
    }
    std::string name = arg.substr(2);
    std::string value;
    const size_t equals = name.find('=');
    if (equals != std::string::npos) {
      value = name.substr(equals + 1);
      name = name.substr(0, equals);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      *error = "--" + name + " needs a value";
      return false;
    }
    try {
      if (name == "mindir_path") {
        options->mindir_path = value;
      } else if (name == "input_path") {
        options->input_path = value;
      } else if (name == "output_path") {
        options->output_path = value;
      } else if (name == "device_id") {
        options->device_id = static_cast<uint32_t>(std::stoul(value));
      } else {
        *error = "unknown option --" + name;
        return false;
      }
    } catch (const std::exception &) {
      *error = "--" + name + ": not a number: " + value;
      return false;
    }
  }
  if (options->mindir_path.empty() || options->input_path.empty() || options->output_path.empty()) {
    *error = "--mindir_path, --input_path and --output_path are required";
    return false;
  }
  return true;
}

bool LoadGraph(const std::string &path, mindspore::Graph *graph, std::string *error) {
  if (mindspore::Serialization::Load(path, mindspore::ModelType::kMindIR, graph) != mindspore::kSuccess) {
    *error = path + ": not a readable MindIR file (corrupt or truncated? export it again with export.py)";
    return false;
  }
  return true;
}

// The compiled models of one export, one per input shape, built on first use.
class ModelCache {
 public:
  ModelCache(const std::string &mindir_path, uint32_t device_id) : device_id_(device_id) {
    const std::string suffix = ".mindir";
    prefix_ = mindir_path;
    if (prefix_.size() > suffix.size() && prefix_.compare(prefix_.size() - suffix.size(), suffix.size(), suffix) == 0) {
      prefix_.resize(prefix_.size() - suffix.size());
    }
  }

  // A corrupt dynamic model would fail every input: callers check it first (as src/ascend310/runner.py).
  bool DynamicModelReadable(std::string *error) const {
    mindspore::Graph graph;
    const std::string path = prefix_ + ".mindir";
    return !delf::FileExists(path) || LoadGraph(path, &graph, error);
  }

  mindspore::Model *Get(int64_t height, int64_t width, std::string *error) {
    const auto key = std::make_pair(height, width);
    auto found = models_.find(key);
    if (found != models_.end()) {
      return found->second.get();
    }
    const std::string shape = std::to_string(height) + "x" + std::to_string(width);
    const std::string static_path = prefix_ + "_" + shape + ".mindir";
    const std::string dynamic_path = prefix_ + ".mindir";
    const bool is_static = delf::FileExists(static_path);
    const std::string path = is_static ? static_path : dynamic_path;
    if (!delf::FileExists(path)) {
      *error = "no model for " + shape + " inputs: neither " + static_path + " nor " + dynamic_path + " exists";
      return nullptr;
    }
    auto context = std::make_shared<mindspore::Context>();
    auto ascend310 = std::make_shared<mindspore::Ascend310DeviceInfo>();
    ascend310->SetDeviceID(device_id_);
    if (!is_static) {
      ascend310->SetInputShapeMap({{0, {1, 3, static_cast<int>(height), static_cast<int>(width)}}});
    }
    context->MutableDeviceInfo().push_back(ascend310);
    mindspore::Graph graph;
    if (!LoadGraph(path, &graph, error)) {
      return nullptr;
    }
    std::cout << "building " << path << " for " << shape << " inputs" << std::endl;
    auto model = std::make_unique<mindspore::Model>();
    if (model->Build(mindspore::GraphCell(graph), context) != mindspore::kSuccess) {
      *error = "building " + path + " for " + shape + " inputs failed";
      return nullptr;
    }
    return (models_[key] = std::move(model)).get();
  }

 private:
  std::string prefix_;
  uint32_t device_id_;
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<mindspore::Model>> models_;
};

}  // namespace

int main(int argc, char **argv) {
  Options options;
  std::string error;
  if (!ParseArgs(argc, argv, &options, &error)) {
    if (!error.empty()) {
      std::cerr << "error: " << error << "\n";
    }
    std::cerr << kUsage;
    return error.empty() ? 0 : 2;
  }
  ModelCache models(options.mindir_path, options.device_id);
  if (!models.DynamicModelReadable(&error)) {
    std::cerr << "error: " << error << std::endl;
    return 2;
  }
  // Kept alive until the loop has written them: Data() may return a host copy owned by the pointer.
  std::vector<mindspore::MSTensor> results;
  std::vector<std::shared_ptr<const void>> host_data;
  const auto start = std::chrono::steady_clock::now();
  int num_failed = 0;
  const int count = delf::ProcessInputs(
      options.input_path, options.output_path,
      [&](const delf::InputFile &input, const std::vector<float> &data, std::vector<delf::OutputBuffer> *outputs,
          std::string *run_error) {
        mindspore::Model *model = models.Get(input.height, input.width, run_error);
        if (model == nullptr) {
          return false;
        }
        const std::vector<mindspore::MSTensor> model_inputs = model->GetInputs();
        const std::vector<int64_t> shape = {1, 3, input.height, input.width};
        std::vector<mindspore::MSTensor> inputs = {mindspore::MSTensor(
            model_inputs[0].Name(), mindspore::DataType::kNumberTypeFloat32, shape, data.data(),
            data.size() * sizeof(float))};
        results.clear();
        host_data.clear();
        if (model->Predict(inputs, &results) != mindspore::kSuccess) {
          *run_error = "Predict failed";
          return false;
        }
        for (const mindspore::MSTensor &result : results) {
          host_data.push_back(result.Data());
          outputs->push_back({host_data.back().get(), result.DataSize()});
        }
        return true;
      },
      &num_failed);
  if (count < 0) {
    return 2;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << count << " level files -> " << options.output_path << " in " << seconds << " s, " << num_failed
            << " failed" << std::endl;
  return num_failed > 0 ? 1 : 0;
}
