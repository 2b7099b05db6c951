// Training subcommands of `nha`: train, export, plot (docs/training.md, docs/checkpoint.md).
#include <CLI/CLI.hpp>

#include <csignal>
#include <filesystem>
#include <iostream>
#include <memory>

#include "apps/cli.h"
#include "apps/test_fault.h"
#include "core/error.h"
#include "core/fileio.h"
#include "core/profile.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/distributed.h"
#include "train/plot.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace nha::apps {

// apps/cmd_interop.cpp: `nha export --format safetensors`.
void export_safetensors_command(const std::string& checkpoint, const std::string& out_dir,
                                DType dtype);

namespace {

volatile std::sig_atomic_t g_stop = 0;  // the signal that asked to stop (0: none)

void on_interrupt(int sig) {
  g_stop = sig;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
  std::signal(SIGTERM, SIG_DFL);
}

}  // namespace

void register_train_commands(CLI::App& app) {
  // nha train CONFIG [--set key=value ...] [--resume] [--gpus N]
  {
    auto config = std::make_shared<std::string>();
    auto sets = std::make_shared<std::vector<std::string>>();
    auto resume = std::make_shared<bool>(false);
    auto quiet = std::make_shared<bool>(false);
    auto gpus = std::make_shared<int>(1);
    auto ranks = std::make_shared<int>(1);
    CLI::App* c = app.add_subcommand("train", "train a model from a YAML run config");
    c->add_option("config", *config, "run config (configs/*.yaml)")->required();
    c->add_option("--set", *sets, "override a key: --set train.lr=1e-3 (repeatable)");
    c->add_flag("--resume", *resume,
                "continue from the newest checkpoint in checkpoint.dir (bitwise identical)");
    c->add_flag("--quiet", *quiet, "no progress lines (metrics.jsonl is still written)");
    c->add_option("--gpus", *gpus,
                  "data parallel on N GPUs of this machine: starts N processes (docs/distributed.md)")
        ->check(kPositive)
        ->capture_default_str();
    c->add_option("--ranks", *ranks,
                  "data parallel with N ranks on this machine: on GPUs the same as --gpus N; with "
                  "train.device=cpu N processes under mpirun (docs/distributed.md)")
        ->check(kPositive)
        ->capture_default_str();
    c->callback([=] {
      RunConfig cfg = load_config(*config, *sets);
      const dist::LaunchInfo launch = dist::launch_info_from_env();
      // CPU ranks communicate over MPI, GPU ranks over NCCL (train/distributed.h).
      const bool cpu = cfg.train.device == "cpu" || (cfg.train.device == "auto" && cuda_device_count() == 0);
      NHA_CHECK(*ranks == 1 || *gpus == 1 || *ranks == *gpus)
          << "--ranks " << *ranks << " and --gpus " << *gpus << " disagree. HINT: give one of them";
      const int n = std::max(*ranks, *gpus);
      if (cpu && n > 1) {
        NHA_CHECK(*gpus == 1) << "--gpus " << *gpus << " but the run trains on the CPU (train.device="
                              << cfg.train.device << "). HINT: --ranks " << *gpus << " for CPU ranks";
        if (launch.launcher == dist::Launcher::None) dist::exec_mpirun_ranks(n);
        NHA_CHECK(launch.world_size == n)
            << "started as rank " << launch.rank << " of " << launch.world_size << " by "
            << dist::launcher_name(launch.launcher) << " but --ranks " << n << ". HINT: the same N";
      } else if (launch.launcher != dist::Launcher::Gpus) {
        *gpus = n;
        // Not a rank started by --gpus: maybe the parent that starts them.
        dist::check_gpus_request(*gpus, cuda_device_count(), launch);
        if (*gpus > 1) {
          // Rank 0 prints the "done" or "stopped" line.
          const int status = dist::run_local_ranks(*gpus, cfg.logging.run_dir);
          if (status != 0) throw ExitStatus{status};
          return;
        }
      } else {
        NHA_CHECK(launch.world_size == n)
            << dist::kEnvWorldSize << "=" << launch.world_size << " but --gpus/--ranks " << n
            << ". HINT: NHA_RANK and friends are set by `nha train --gpus N`; unset them";
      }
      TrainerOptions o;
      o.resume = *resume;
      o.log = *quiet ? nullptr : &std::cout;
      o.stop_flag = &g_stop;
      std::signal(SIGINT, on_interrupt);
      std::signal(SIGTERM, on_interrupt);
      try {
        // Declared before the trainer, so it is destroyed after it (also when an error unwinds).
        std::unique_ptr<dist::ProcessGroup> group;
        if (launch.distributed())
          group = dist::join_process_group(launch, cpu, cfg.train.dist_timeout_s);
        o.group = group.get();
        if (launch.distributed())
          o.before_step = [rank = launch.rank](int64_t step) { inject_test_fault(rank, step); };
        Trainer trainer(cfg, o);
        trainer.train();
        // Scripts must tell an interrupted run from a finished one: the shell's 128 + signal.
        if (g_stop && trainer.step() < trainer.total_steps()) {
          if (launch.rank == 0)
            std::cout << "stopped at step " << trainer.step() << " of " << trainer.total_steps()
                      << " (checkpoint written; continue with --resume)\n";
          throw ExitStatus{128 + int(g_stop)};
        }
        if (launch.rank == 0)
          std::cout << "done: " << trainer.step() << " steps, run dir " << trainer.run_dir() << "\n";
        // NHA_PROFILE=1: the CPU ops' times over the whole run (core/profile.h), also kept in the
        // run dir beside metrics.jsonl.
        if (profile::enabled() && launch.rank == 0) {
          const std::string table = profile::table();
          std::cout << "profile (" << trainer.step() << " steps, this process's CPU ops):\n" << table;
          write_file_atomic((fs::path(trainer.run_dir()) / "profile.txt").string(), table);
        }
      } catch (const Error& e) {
        if (!launch.distributed()) throw;
        // Name the rank: every rank prints its own error, and the launcher reports the first.
        throw Error("rank " + std::to_string(launch.rank) + " of " +
                    std::to_string(launch.world_size) + ": " + e.what());
      }
    });
  }

  // nha export RUN_OR_CKPT --out FILE [--dtype bf16|fp32] [--format h5|safetensors]
  {
    auto src = std::make_shared<std::string>();
    auto out = std::make_shared<std::string>();
    auto dtype = std::make_shared<std::string>("bf16");
    auto format = std::make_shared<std::string>("h5");
    CLI::App* c = app.add_subcommand(
        "export", "write a parameters-only HDF5 (or safetensors) file from a checkpoint");
    c->add_option("run_or_checkpoint", *src, "run directory (newest checkpoint) or checkpoint .h5")
        ->required();
    c->add_option("--out", *out, "output .h5 (a directory for --format safetensors)")->required();
    c->add_option("--dtype", *dtype, "bf16 or fp32")->capture_default_str();
    c->add_option("--format", *format, "h5, or safetensors: DIR/model.safetensors + config.json "
                                       "(Llama names for Transformer++; docs/interop.md)")
        ->check(CLI::IsMember({"h5", "safetensors"}))
        ->capture_default_str();
    c->callback([=] {
      NHA_CHECK(*dtype == "bf16" || *dtype == "fp32")
          << "--dtype is '" << *dtype << "'. HINT: use bf16 (half the size) or fp32 (exact)";
      const std::string ckpt = resolve_checkpoint(*src);
      if (*format == "safetensors") {
        export_safetensors_command(ckpt, *out, *dtype == "bf16" ? DType::BF16 : DType::F32);
        return;
      }
      export_parameters(ckpt, *out, *dtype == "bf16" ? DType::BF16 : DType::F32);
      std::cout << "wrote " << *out << " (" << *dtype << ", from " << ckpt << ", "
                << fs::file_size(*out) / (1024 * 1024) << " MiB)\n";
    });
  }

  // nha plot RUN [RUN...] --out loss.svg
  {
    auto runs = std::make_shared<std::vector<std::string>>();
    auto out = std::make_shared<std::string>("loss.svg");
    auto title = std::make_shared<std::string>("loss vs tokens");
    CLI::App* c = app.add_subcommand("plot", "SVG of train/val loss vs tokens for one or more runs");
    c->add_option("runs", *runs, "run directories (or metrics .jsonl files)")->required();
    c->add_option("--out", *out, "output .svg")->capture_default_str();
    c->add_option("--title", *title, "plot title")->capture_default_str();
    c->callback([=] {
      write_loss_plot(*runs, *out, *title);
      std::cout << "wrote " << *out << "\n";
    });
  }
}

}  // namespace nha::apps
