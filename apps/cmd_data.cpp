// Data subcommands of `nha`: tokenizer train/encode/decode/info, prepare, data info/bench, mqar.
#include <CLI/CLI.hpp>

#include <chrono>
#include <fstream>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/cli.h"
#include "core/error.h"
#include "data/loader.h"
#include "data/mqar.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace nha::apps {

namespace {

using data::Tokenizer;

void tokenizer_commands(CLI::App& app) {
  CLI::App* tok = app.add_subcommand("tokenizer", "train, inspect and run a sentencepiece tokenizer");
  tok->require_subcommand(1);

  // nha tokenizer train --input FILE... --vocab N --out tok.model
  {
    auto inputs = std::make_shared<std::vector<std::string>>();
    auto out = std::make_shared<std::string>();
    auto o = std::make_shared<data::TokenizerTrainOptions>();
    CLI::App* c = tok->add_subcommand("train", "train a BPE tokenizer (byte fallback, deterministic)");
    c->add_option("--input", *inputs, "text files / directories / .jsonl (.zst ok)")->required();
    c->add_option("--vocab", o->vocab_size, "vocabulary size")->required()->check(kPositive);
    c->add_option("--out", *out, "output .model path")->required();
    c->add_option("--model-type", o->model_type, "bpe or unigram")->capture_default_str();
    c->add_option("--character-coverage", o->character_coverage,
                  "characters covered by pieces; the rest fall back to bytes")->capture_default_str();
    c->add_option("--max-sentences", o->max_sentences, "lines sampled for training (0 = all)")
        ->check(kNonNegative)
        ->capture_default_str();
    c->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
    c->add_option("--threads", o->num_threads, "trainer threads (1 = byte-reproducible)")
        ->check(CLI::Range(1, 1024))
        ->capture_default_str();
    c->add_option("--jsonl-field", o->jsonl_field, "text field of .jsonl inputs")->capture_default_str();
    c->add_flag("--verbose", o->verbose, "show sentencepiece's training log");
    c->callback([inputs, out, o] {
      auto t0 = std::chrono::steady_clock::now();
      Tokenizer t = Tokenizer::train(*inputs, *out, *o);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("wrote %s: vocab %lld, %s, unk %d bos %d eos %d pad %d (%.1f s)\n", out->c_str(),
                  (long long)t.vocab_size(), t.hash_hex().c_str(), t.unk_id(), t.bos_id(),
                  t.eos_id(), t.pad_id(), s);
    });
  }

  // nha tokenizer info --tokenizer tok.model
  {
    auto path = std::make_shared<std::string>();
    CLI::App* c = tok->add_subcommand("info", "print vocabulary size, special ids and hash");
    c->add_option("--tokenizer,-t", *path, "sentencepiece .model")->required();
    c->callback([path] {
      Tokenizer t = Tokenizer::load(*path);
      std::printf("%s: vocab %lld, %s, unk %d bos %d eos %d pad %d\n", path->c_str(),
                  (long long)t.vocab_size(), t.hash_hex().c_str(), t.unk_id(), t.bos_id(),
                  t.eos_id(), t.pad_id());
    });
  }

  // nha tokenizer encode --tokenizer tok.model [--text T | --input FILE] [--pieces]
  {
    auto path = std::make_shared<std::string>();
    auto text = std::make_shared<std::string>();
    auto file = std::make_shared<std::string>();
    auto pieces = std::make_shared<bool>(false);
    CLI::App* c = tok->add_subcommand("encode", "text -> token ids (stdin when no --text/--input)");
    c->add_option("--tokenizer,-t", *path, "sentencepiece .model")->required();
    c->add_option("--text", *text, "text to encode");
    c->add_option("--input", *file, "file to encode");
    c->add_flag("--pieces", *pieces, "print pieces instead of ids");
    c->callback([path, text, file, pieces] {
      Tokenizer t = Tokenizer::load(*path);
      std::string s = *text;
      if (!file->empty()) {
        std::ifstream in(*file, std::ios::binary);
        NHA_CHECK(in.good()) << "cannot read '" << *file << "'. HINT: check the path";
        std::ostringstream ss;
        ss << in.rdbuf();
        s = ss.str();
      } else if (text->empty()) {
        std::ostringstream ss;
        ss << std::cin.rdbuf();
        s = ss.str();
      }
      std::vector<int32_t> ids = t.encode(s);
      for (size_t i = 0; i < ids.size(); ++i) {
        if (i) std::cout << ' ';
        if (*pieces) std::cout << t.piece(ids[i]);
        else std::cout << ids[i];
      }
      std::cout << "\n";
      std::cerr << ids.size() << " tokens, " << s.size() << " bytes\n";
    });
  }

  // nha tokenizer decode --tokenizer tok.model ID...   (or ids on stdin)
  {
    auto path = std::make_shared<std::string>();
    auto ids = std::make_shared<std::vector<int32_t>>();
    CLI::App* c = tok->add_subcommand("decode", "token ids -> text (ids on stdin when none given)");
    c->add_option("--tokenizer,-t", *path, "sentencepiece .model")->required();
    c->add_option("ids", *ids, "token ids");
    c->callback([path, ids] {
      Tokenizer t = Tokenizer::load(*path);
      std::vector<int32_t> v = *ids;
      if (v.empty()) {
        long long x;
        while (std::cin >> x) v.push_back(int32_t(x));
      }
      std::cout << t.decode(v) << "\n";
    });
  }
}

void prepare_command(CLI::App& app) {
  auto tok_path = std::make_shared<std::string>();
  auto o = std::make_shared<data::PrepareOptions>();
  auto split = std::make_shared<std::string>("paragraph");
  CLI::App* c = app.add_subcommand("prepare", "tokenize text into HDF5 token shards (train/val)");
  c->add_option("--tokenizer,-t", *tok_path, "sentencepiece .model")->required();
  c->add_option("--input", o->inputs, "text files / directories / .jsonl (.zst ok), in order")
      ->required();
  c->add_option("--out", o->out_dir, "output directory")->required();
  c->add_option("--val-fraction", o->val_fraction, "fraction of documents held out")
      ->capture_default_str();
  c->add_option("--split-seed", o->split_seed, "seed of the train/val split")->capture_default_str();
  c->add_option("--jsonl-field", o->source.jsonl_field, "text field of .jsonl inputs")
      ->capture_default_str();
  c->add_option("--doc-split", *split, "plain-text documents: paragraph (blank lines), line, file")
      ->capture_default_str();
  c->add_option("--threads", o->threads, "encoding threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  c->add_option("--shard-tokens", o->shard_tokens, "max tokens per shard")
      ->check(kPositive)
      ->capture_default_str();
  c->add_flag("--force", o->force, "replace shards already in --out");
  c->add_flag("--quiet", o->quiet, "no progress lines");
  c->callback([tok_path, o, split] {
    o->source.doc_split = data::doc_split_from_name(*split);
    Tokenizer t = Tokenizer::load(*tok_path);
    data::PrepareStats s = data::prepare(t, *o);
    std::printf("train: %lld docs, %lld tokens, %lld shard(s); val: %lld docs, %lld tokens, %lld "
                "shard(s); %.1f MB text in %.1f s (%.2f M tok/s) -> %s\n",
                (long long)s.documents[0], (long long)s.tokens[0], (long long)s.shards[0],
                (long long)s.documents[1], (long long)s.tokens[1], (long long)s.shards[1],
                double(s.bytes) / 1e6, s.seconds,
                double(s.tokens[0] + s.tokens[1]) / 1e6 / std::max(s.seconds, 1e-9),
                o->out_dir.c_str());
  });
}

void data_commands(CLI::App& app) {
  CLI::App* d = app.add_subcommand("data", "inspect token shards, measure the loader");
  d->require_subcommand(1);
  {
    auto dir = std::make_shared<std::string>();
    CLI::App* c = d->add_subcommand("info", "print the shards' attributes");
    c->add_option("dir", *dir, "directory written by `nha prepare`")->required();
    c->callback([dir] {
      for (const char* split : {"train", "val"}) {
        for (const std::string& p : data::find_shards(*dir, split)) {
          data::ShardMeta m = data::read_shard_meta(p);
          std::printf("%s: %s shard %lld, %lld docs, %lld tokens (uint%d), vocab %lld, eos %lld, %s\n",
                      p.c_str(), m.split.c_str(), (long long)m.shard_index,
                      (long long)m.num_documents, (long long)m.num_tokens, m.token_bytes * 8,
                      (long long)m.vocab_size, (long long)m.eos_id, m.tokenizer_hash.c_str());
        }
      }
    });
  }
  {
    auto dir = std::make_shared<std::string>();
    auto o = std::make_shared<data::LoaderOptions>();
    auto mode = std::make_shared<std::string>("random");
    auto steps = std::make_shared<int64_t>(200);
    CLI::App* c = d->add_subcommand("bench", "loader throughput in tokens/s (prefetch included)");
    c->add_option("dir", *dir, "directory written by `nha prepare`")->required();
    c->add_option("--seq-len", o->seq_len)->check(kPositive)->capture_default_str();
    c->add_option("--batch", o->global_batch)->check(kPositive)->capture_default_str();
    c->add_option("--mode", *mode, "random, doc_aligned or epoch")->capture_default_str();
    c->add_option("--steps", *steps)->check(kPositive)->capture_default_str();
    c->add_option("--prefetch", o->prefetch)->check(kNonNegative)->capture_default_str();
    c->callback([dir, o, mode, steps] {
      o->mode = data::sample_mode_from_name(*mode);
      auto shards = data::ShardSet::open(*dir, "train");
      data::TrainLoader loader(shards, *o);
      loader.next();  // start-up (page faults of the first windows)
      auto t0 = std::chrono::steady_clock::now();
      int64_t sum = 0;
      for (int64_t i = 0; i < *steps; ++i) sum += loader.next().inputs.data<int32_t>()[0];
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double tok = double(*steps) * double(o->global_batch) * double(o->seq_len);
      std::printf("loader %s: %lld steps of [%lld, %lld] in %.3f s = %.1f M tokens/s (checksum %lld)\n",
                  mode->c_str(), (long long)*steps, (long long)o->global_batch,
                  (long long)o->seq_len, s, tok / s / 1e6, (long long)sum);
    });
  }
}

void mqar_command(CLI::App& app) {
  auto preset = std::make_shared<std::string>("train");
  auto show = std::make_shared<int64_t>(2);
  auto seed = std::make_shared<int64_t>(-1);
  CLI::App* c = app.add_subcommand("mqar", "show MQAR (Zoology) examples of a preset");
  c->add_option("--preset", *preset, "train, zoology-train, test, or L<len>-K<pairs>[-N<n>][-V<vocab>]")
      ->capture_default_str();
  c->add_option("--show", *show, "examples to print")
      ->check(kNonNegative)
      ->capture_default_str();
  c->add_option("--seed", *seed, "override the preset's seed");
  c->callback([preset, show, seed] {
    data::MqarOptions o = data::mqar_preset(*preset);
    if (*seed >= 0) o.seed = uint64_t(*seed);
    data::MqarDataset ds(o, 1, 1, 0, false);
    std::printf("MQAR %s: V=%lld, a=%g, seed %llu, %lld examples, padded length %lld\n",
                o.name.c_str(), (long long)o.vocab_size, o.power_a, (unsigned long long)o.seed,
                (long long)ds.size(), (long long)ds.seq_len());
    for (const data::MqarSetting& s : o.settings)
      std::printf("  L=%lld K=%lld N=%lld\n", (long long)s.seq_len, (long long)s.num_kv_pairs,
                  (long long)s.num_examples);
    for (int64_t i = 0; i < std::min(*show, ds.size()); ++i) {
      data::Batch b = ds.examples(i, 1);
      const int32_t* in = b.inputs.data<int32_t>();
      const int32_t* tg = b.targets.data<int32_t>();
      std::printf("example %lld (position:input[->target]):\n ", (long long)i);
      for (int64_t t = 0; t < ds.seq_len(); ++t) {
        if (tg[t] != data::kIgnoreIndex) std::printf(" %lld:%d->%d", (long long)t, in[t], tg[t]);
        else std::printf(" %d", in[t]);
      }
      std::printf("\n");
    }
  });
}

}  // namespace

void register_data_commands(CLI::App& app) {
  tokenizer_commands(app);
  prepare_command(app);
  data_commands(app);
  mqar_command(app);
}

}  // namespace nha::apps
