// Status helpers shared by every module (absl::Status / StatusOr across module boundaries).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define FM_CONCAT_INNER(a, b) a##b
#define FM_CONCAT(a, b) FM_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` yields a non-OK absl::Status.
#define FM_RETURN_IF_ERROR(expr)                  \
  do {                                            \
    ::absl::Status fm_status_ = (expr);           \
    if (!fm_status_.ok()) return fm_status_;      \
  } while (0)

// `lhs = value of expr` or return its error. lhs may declare a variable.
#define FM_ASSIGN_OR_RETURN(lhs, expr) \
  FM_ASSIGN_OR_RETURN_IMPL(FM_CONCAT(fm_statusor_, __LINE__), lhs, expr)
#define FM_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
