// The message of an exception caught at the C boundary, as a malloc'd string for the Rust side
// (`libtorch::c_result` frees it): for libtorch's errors without the C++ stack trace they
// append to `what()`, dozens of lines of addresses under which a log that keeps its last lines
// lost the reason itself (the H200 run of 2026-11-28, an f16 graph capture).
#pragma once

#include <c10/util/Exception.h>

#include <cstring>
#include <exception>

inline char* stu_error_message(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return strdup(c->what_without_backtrace());
  return strdup(e.what());
}
