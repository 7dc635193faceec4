#include "pipeline/tokenizer_spm.h"

#include <sentencepiece_processor.h>

namespace kiln::pipeline {

bool ReadSpmModel(const std::string& path, SpmModelData* out, std::string* error) {
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.Load(path);
  if (!status.ok()) {
    *error = status.ToString();
    return false;
  }
  const int n = sp.GetPieceSize();
  out->pieces.clear();
  out->scores.clear();
  out->control.clear();
  for (int id = 0; id < n; ++id) {
    out->pieces.push_back(sp.IdToPiece(id));
    out->scores.push_back(sp.GetScore(id));
    out->control.push_back(sp.IsControl(id) || sp.IsUnknown(id));
  }
  out->unk_id = sp.unk_id();
  out->serialized_proto = sp.serialized_model_proto();
  return true;
}

}  // namespace kiln::pipeline
