/**
 * The runner's side of the file protocol of src/ascend310/protocol.py.
 *
 * Input:  <input_dir>/<stem>_<H>x<W>.bin   raw float32, shape (1, 3, H, W); consumed (deleted).
 * Output: every output of the network, in its order: <output_dir>/<stem>_<H>x<W>_attention.bin
 *         (1, 1, h, w), ..._features.bin (1, D, h, w) and, for DELG, ..._global.bin (1, G).
 * Files are written under a hidden temporary name and renamed, so a reader never sees half a file.
 *
 * Nothing here depends on MindSpore: the loop takes the network as a callback.
 */
#ifndef DELF_ASCEND310_INFER_INC_UTILS_H_
#define DELF_ASCEND310_INFER_INC_UTILS_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace delf {

constexpr size_t kMaxOutputs = 3;
// attention, features, global: the network's outputs in order (DELF gives the first 2, DELG all 3)
extern const char *const kOutputSuffixes[kMaxOutputs];

struct InputFile {
  std::string name;  // e.g. 000003_l2_362x512.bin
  std::string stem;  // e.g. 000003_l2
  int64_t height = 0;
  int64_t width = 0;
};

// Parses "<stem>_<H>x<W>.bin" (not hidden); false for any other name.
bool ParseInputName(const std::string &name, InputFile *file);

// Names of the finished input files in `dir`, sorted (hidden temporaries are skipped).
std::vector<std::string> ListInputFiles(const std::string &dir);

bool FileExists(const std::string &path);
// mkdir -p; true when the directory exists afterwards.
bool MakeDirectories(const std::string &path);
std::string JoinPath(const std::string &dir, const std::string &name);

// Reads exactly `count` float32 values; false (with a message) for a missing or wrong-sized file.
bool ReadFloatFile(const std::string &path, size_t count, std::vector<float> *data, std::string *error);

// Writes `size` bytes to a hidden temporary beside `path`, then renames it to `path`.
bool WriteFileAtomically(const std::string &path, const void *data, size_t size, std::string *error);

// One network output: raw float32 bytes.
struct OutputBuffer {
  const void *data = nullptr;
  size_t size = 0;
};

// Runs the network on one input (1, 3, H, W); fills its outputs (attention, features[, global]),
// whose memory must stay valid until the next call.
using RunNetwork = std::function<bool(const InputFile &input, const std::vector<float> &data,
                                      std::vector<OutputBuffer> *outputs, std::string *error)>;

// Runs every input file present in `input_dir` once. A file that cannot be run is reported on stderr
// as "error: <input path>: <reason>", counted in `*num_failed` and left in place; the others go on.
// Returns the number of files run, or -1 after printing an error that stops the run (output not writable).
int ProcessInputs(const std::string &input_dir, const std::string &output_dir, const RunNetwork &run,
                  int *num_failed);

}  // namespace delf

#endif  // DELF_ASCEND310_INFER_INC_UTILS_H_
