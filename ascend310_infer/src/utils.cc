/**
 * File protocol of the DELF 310 runner (see inc/utils.h).
 */
#include "inc/utils.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <regex>
#include <thread>

namespace delf {

const char kDoneMarker[] = "DONE";
const char *const kOutputSuffixes[2] = {"_attention.bin", "_features.bin"};

namespace {
constexpr auto kPollInterval = std::chrono::milliseconds(200);
}  // namespace

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

int ProcessInputs(const std::string &input_dir, const std::string &output_dir, double wait_timeout_s,
                  const RunNetwork &run) {
  using Clock = std::chrono::steady_clock;
  int count = 0;
  auto idle_since = Clock::now();
  std::vector<float> data;
  std::vector<OutputBuffer> outputs;
  std::string error;
  if (!MakeDirectories(output_dir)) {
    std::cerr << "error: cannot create the output directory " << output_dir << std::endl;
    return -1;
  }
  while (true) {
    const std::vector<std::string> names = ListInputFiles(input_dir);
    for (const std::string &name : names) {
      InputFile input;
      const std::string input_path = JoinPath(input_dir, name);
      if (!ParseInputName(name, &input)) {
        std::cerr << "error: " << input_path << ": not an input file name <stem>_<H>x<W>.bin" << std::endl;
        return -1;
      }
      if (!ReadFloatFile(input_path, static_cast<size_t>(3 * input.height * input.width), &data, &error)) {
        std::cerr << "error: " << error << std::endl;
        return -1;
      }
      outputs.clear();
      if (!run(input, data, &outputs, &error)) {
        std::cerr << "error: " << input_path << ": " << error << std::endl;
        return -1;
      }
      if (outputs.size() != 2) {
        std::cerr << "error: the network gave " << outputs.size() << " outputs, expected 2 (attention, features)"
                  << std::endl;
        return -1;
      }
      const std::string base = name.substr(0, name.size() - 4);
      for (size_t i = 0; i < outputs.size(); ++i) {
        const std::string target = JoinPath(output_dir, base + kOutputSuffixes[i]);
        if (!WriteFileAtomically(target, outputs[i].data, outputs[i].size, &error)) {
          std::cerr << "error: " << error << std::endl;
          return -1;
        }
      }
      std::remove(input_path.c_str());
      ++count;
    }
    if (!names.empty()) {
      idle_since = Clock::now();
      continue;
    }
    if (FileExists(JoinPath(input_dir, kDoneMarker)) && ListInputFiles(input_dir).empty()) {
      break;
    }
    if (std::chrono::duration<double>(Clock::now() - idle_since).count() > wait_timeout_s) {
      std::cerr << "error: no input in " << input_dir << " for " << wait_timeout_s << " s and no " << kDoneMarker
                << " marker from src.preprocess: is it running?" << std::endl;
      return -1;
    }
    std::this_thread::sleep_for(kPollInterval);
  }
  if (!WriteFileAtomically(JoinPath(output_dir, kDoneMarker), "", 0, &error)) {
    std::cerr << "error: " << error << std::endl;
    return -1;
  }
  return count;
}

}  // namespace delf
