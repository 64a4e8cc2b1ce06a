/**
 * File protocol of the DELF 310 runner (see inc/utils.h).
 */
#include "inc/utils.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <regex>

namespace delf {

const char *const kOutputSuffixes[kMaxOutputs] = {"_attention.bin", "_features.bin", "_global.bin"};

bool ParseInputName(const std::string &name, InputFile *file) {
  static const std::regex pattern(R"(^([^.].*)_([0-9]+)x([0-9]+)\.bin$)");
  std::smatch match;
  if (!std::regex_match(name, match, pattern)) {
    return false;
  }
  file->name = name;
  file->stem = match[1].str();
  file->height = std::stoll(match[2].str());
  file->width = std::stoll(match[3].str());
  return file->height > 0 && file->width > 0;
}

std::vector<std::string> ListInputFiles(const std::string &dir) {
  std::vector<std::string> names;
  DIR *handle = opendir(dir.c_str());
  if (handle == nullptr) {
    return names;
  }
  for (dirent *entry = readdir(handle); entry != nullptr; entry = readdir(handle)) {
    std::string name = entry->d_name;
    if (name.size() > 4 && name[0] != '.' && name.compare(name.size() - 4, 4, ".bin") == 0) {
      names.push_back(name);
    }
  }
  closedir(handle);
  std::sort(names.begin(), names.end());
  return names;
}

bool FileExists(const std::string &path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0;
}

bool MakeDirectories(const std::string &path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos; slash = path.find('/', slash + 1)) {
    mkdir(path.substr(0, slash).c_str(), 0755);  // an existing parent is fine; the final check decides
  }
  mkdir(path.c_str(), 0755);
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

std::string JoinPath(const std::string &dir, const std::string &name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

bool ReadFloatFile(const std::string &path, size_t count, std::vector<float> *data, std::string *error) {
  std::ifstream stream(path, std::ios::binary | std::ios::ate);
  if (!stream) {
    *error = path + ": cannot open";
    return false;
  }
  const auto bytes = static_cast<size_t>(stream.tellg());
  if (bytes != count * sizeof(float)) {
    *error = path + ": " + std::to_string(bytes) + " bytes, expected " + std::to_string(count * sizeof(float)) +
             " (truncated, or not written by src.preprocess?)";
    return false;
  }
  data->resize(count);
  stream.seekg(0);
  if (!stream.read(reinterpret_cast<char *>(data->data()), static_cast<std::streamsize>(bytes))) {
    *error = path + ": read failed";
    return false;
  }
  return true;
}

bool WriteFileAtomically(const std::string &path, const void *data, size_t size, std::string *error) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string temporary = dir + "." + name + "." + std::to_string(getpid()) + ".tmp";
  {
    std::ofstream stream(temporary, std::ios::binary | std::ios::trunc);
    if (!stream || !stream.write(static_cast<const char *>(data), static_cast<std::streamsize>(size)) ||
        !stream.flush()) {
      std::remove(temporary.c_str());
      *error = path + ": cannot write (disk full?)";
      return false;
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    *error = path + ": cannot rename the temporary file into place";
    return false;
  }
  return true;
}

namespace {

enum class Result { kDone, kFailed, kStop };

// One input file: read, run, write every output, delete it. Otherwise `error` starts with the file's path.
Result RunOne(const std::string &input_dir, const std::string &output_dir, const std::string &name,
              const RunNetwork &run, std::vector<float> *data, std::vector<OutputBuffer> *outputs,
              std::string *error) {
  const std::string input_path = JoinPath(input_dir, name);
  InputFile input;
  if (!ParseInputName(name, &input)) {
    *error = input_path + ": not an input file name <stem>_<H>x<W>.bin";
    return Result::kFailed;
  }
  if (!ReadFloatFile(input_path, static_cast<size_t>(3 * input.height * input.width), data, error)) {
    return Result::kFailed;
  }
  outputs->clear();
  if (!run(input, *data, outputs, error)) {
    *error = input_path + ": " + *error;
    return Result::kFailed;
  }
  if (outputs->size() < 2 || outputs->size() > kMaxOutputs) {
    *error = input_path + ": the network gave " + std::to_string(outputs->size()) +
             " outputs, expected 2 (attention, features: DELF) or 3 (and the global descriptor: DELG)";
    return Result::kFailed;
  }
  const std::string base = name.substr(0, name.size() - 4);
  for (size_t i = 0; i < outputs->size(); ++i) {
    const std::string target = JoinPath(output_dir, base + kOutputSuffixes[i]);
    if (!WriteFileAtomically(target, (*outputs)[i].data, (*outputs)[i].size, error)) {
      return Result::kStop;  // a full disk: no point going on
    }
  }
  std::remove(input_path.c_str());
  return Result::kDone;
}

}  // namespace

int ProcessInputs(const std::string &input_dir, const std::string &output_dir, const RunNetwork &run,
                  int *num_failed) {
  int count = 0;
  *num_failed = 0;
  std::vector<float> data;
  std::vector<OutputBuffer> outputs;
  std::string error;
  if (!MakeDirectories(output_dir)) {
    std::cerr << "error: cannot create the output directory " << output_dir << std::endl;
    return -1;
  }
  for (const std::string &name : ListInputFiles(input_dir)) {
    const Result result = RunOne(input_dir, output_dir, name, run, &data, &outputs, &error);
    if (result == Result::kDone) {
      ++count;
      continue;
    }
    std::cerr << "error: " << error << std::endl;
    if (result == Result::kStop) {
      return -1;
    }
    ++*num_failed;
  }
  return count;
}

}  // namespace delf
