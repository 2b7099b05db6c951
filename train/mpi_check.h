// MPI_CHECK: every MPI call is checked; the message carries MPI's own explanation (builds with MPI).
#pragma once
#ifdef NHA_WITH_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: no deprecated C++ bindings to link
#include <mpi.h>

#include <string>

#include "core/error.h"

#define MPI_CHECK(call)                                                                         \
  do {                                                                                          \
    const int nha_mpi_ = (call);                                                                \
    if (nha_mpi_ != MPI_SUCCESS) {                                                              \
      char nha_msg_[MPI_MAX_ERROR_STRING];                                                      \
      int nha_len_ = 0;                                                                         \
      MPI_Error_string(nha_mpi_, nha_msg_, &nha_len_);                                          \
      NHA_FAIL() << "MPI error in " #call ": " << std::string(nha_msg_, size_t(nha_len_));      \
    }                                                                                           \
  } while (0)
#endif
