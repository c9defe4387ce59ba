#!/usr/bin/env bash
# nodetunnel's h2 fork: vendor/h2/ is the published h2 crate with the
# patch series vendor/h2/patches/*.patch applied (see PATCHES.md). Made from
# vendor/h2/fork.sh; only the crate, its checksum and `strip` differ.
#
#   fork.sh rebuild      rewrite vendor/h2/ from the crate and the series
#   fork.sh check        fail (and show the difference) unless vendor/h2/
#                        is exactly what `rebuild` produces
#   fork.sh edit DIR     the crate in DIR as a git repository, one commit per
#                        patch on top of the commit `base` (to add, change or
#                        re-apply patches with git: commit, rebase -i, ...)
#   fork.sh export DIR   write DIR's commits after `base` back as the series
#                        (git format-patch), then rebuild
#
# The crate comes from cargo's registry cache; when it is not there, cargo
# fetches it (a throwaway package depending on h2 = "=VERSION"), so only
# crates.io is needed. Its checksum is verified before use.
set -euo pipefail

VERSION=0.4.21
# crates.io checksum of h2-0.4.21.crate (as in a Cargo.lock)
SHA256=b634322c4924093fe6a6e05ecbe5717cd3c6014934455f4ae8e5cf14ba3264a8

FORK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Files of vendor/h2/ that describe the fork and are not produced by it.
# (`target` in case someone builds there without CARGO_TARGET_DIR.)
OWN=(PATCHES.md patches fork.sh target)

die() {
  echo "fork.sh: $*" >&2
  exit 1
}

git_() {
  git -c user.name=h2-fork -c user.email=h2-fork@localhost \
    -c commit.gpgsign=false -c core.autocrlf=false "$@"
}

# The path of the .crate, fetched through cargo if it is not cached yet.
crate_file() {
  local cargo_home=${CARGO_HOME:-$HOME/.cargo} f
  f=$(find "$cargo_home/registry/cache" -name "h2-$VERSION.crate" 2>/dev/null | head -n 1)
  if [ -z "$f" ]; then
    local tmp
    tmp=$(mktemp -d)
    mkdir -p "$tmp/src"
    printf '[package]\nname = "h2-fork-fetch"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nh2 = "=%s"\n' \
      "$VERSION" >"$tmp/Cargo.toml"
    : >"$tmp/src/lib.rs"
    echo "fork.sh: fetching h2 $VERSION through cargo" >&2
    (cd "$tmp" && cargo fetch --quiet) >&2
    rm -rf "$tmp"
    f=$(find "$cargo_home/registry/cache" -name "h2-$VERSION.crate" | head -n 1)
    [ -n "$f" ] || die "cargo fetch did not leave h2-$VERSION.crate in $cargo_home/registry/cache"
  fi
  echo "$(sha256sum "$f" | cut -d' ' -f1)" | grep -qx "$SHA256" ||
    die "$f: sha256 is not $SHA256"
  echo "$f"
}

# Removes from the extracted crate in $1 what is not vendored: cargo's VCS
# note (the examples and benches stay: h2's Cargo.toml names them).
strip() {
  local d=$1
  rm -rf "$d/.cargo_vcs_info.json"
  no_key_material "$d" "the stripped crate"
}

# Fails if anything in $1 looks like a private key (a PEM body after a
# BEGIN line, or an OpenSSH key blob).
no_key_material() {
  if grep -rnE --exclude-dir=.git -A1 'PRIVATE KEY-----$' "$1" | grep -E -- '-[0-9]+-[A-Za-z0-9+/=]{40,}$' ||
    grep -rnE --exclude-dir=.git 'b3BlbnNzaC1rZXktdjE|PRIVATE KEY-----(\\n)[A-Za-z0-9+/]{20}' "$1"; then
    die "private key material in $2 (above)"
  fi
}

# The crate, stripped, with the series applied, in the new git repository
# $1 (commit `base` tagged, then one commit per patch).
build() {
  local d=$1 crate p
  crate=$(crate_file)
  mkdir -p "$d"
  tar -xzf "$crate" -C "$d" --strip-components=1
  strip "$d"
  git_ -C "$d" init -q
  git_ -C "$d" add -A
  git_ -C "$d" commit -q -m "h2 $VERSION (crates.io), stripped by fork.sh"
  git_ -C "$d" tag base
  for p in "$FORK_DIR"/patches/*.patch; do
    [ -e "$p" ] || continue
    if head -n 1 "$p" | grep -q '^From '; then # git format-patch
      git_ -C "$d" am --quiet --committer-date-is-author-date "$p" ||
        die "$(basename "$p") does not apply (git -C $d am --show-current-patch)"
    else # a plain diff (paths a/src/..., b/src/...)
      git_ -C "$d" apply --whitespace=nowarn "$p" || die "$(basename "$p") does not apply"
      git_ -C "$d" add -A
      git_ -C "$d" commit -q -m "$(basename "$p" .patch)"
    fi
  done
  no_key_material "$d" "the patched tree"
}

excludes() {
  local x
  for x in "${OWN[@]}" .git; do printf -- '-x\n%s\n' "$x"; done
}

cmd=${1:-}
case "$cmd" in
rebuild)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  build "$tmp/h2"
  # Replace everything but the fork's own files.
  for f in "$FORK_DIR"/* "$FORK_DIR"/.[!.]*; do
    [ -e "$f" ] || continue
    case " ${OWN[*]} " in *" $(basename "$f") "*) continue ;; esac
    rm -rf "$f"
  done
  rm -rf "$tmp/h2/.git"
  cp -a "$tmp/h2/." "$FORK_DIR/"
  echo "fork.sh: vendor/h2 rebuilt from h2 $VERSION and $(ls "$FORK_DIR"/patches/*.patch | wc -l) patches"
  ;;
check)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  build "$tmp/h2"
  mapfile -t x < <(excludes)
  if ! diff -r "${x[@]}" "$tmp/h2" "$FORK_DIR" >"$tmp/diff"; then
    sed "s|$tmp/h2|(rebuilt)|g" "$tmp/diff" | head -n 200
    die "vendor/h2 differs from h2 $VERSION + patches/ (above: rebuilt vs committed). Change the fork through a patch: see PATCHES.md"
  fi
  echo "fork.sh: vendor/h2 is h2 $VERSION + $(ls "$FORK_DIR"/patches/*.patch | wc -l) patches"
  ;;
edit)
  dir=${2:-}
  [ -n "$dir" ] || die "usage: fork.sh edit DIR"
  [ ! -e "$dir" ] || die "$dir exists"
  build "$dir"
  echo "fork.sh: $dir holds h2 $VERSION (tag base) and the series, one commit per patch."
  echo "  change it with git, then: $0 export $dir"
  ;;
export)
  dir=${2:-}
  [ -d "$dir/.git" ] || die "usage: fork.sh export DIR (a directory made by fork.sh edit)"
  rm -f "$FORK_DIR"/patches/*.patch
  mkdir -p "$FORK_DIR/patches"
  git_ -C "$dir" format-patch --quiet --no-numbered --zero-commit --no-signature --full-index \
    -o "$FORK_DIR/patches" base..HEAD
  "$0" rebuild
  ;;
*)
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
