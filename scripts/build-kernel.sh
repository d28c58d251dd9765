#!/usr/bin/env bash
# Build (or find in the cache) the runv guest kernel: an uncompressed ELF
# vmlinux with a PVH entry point. See docs/guest-kernel.md and --help.
#
# stdout carries exactly one line, the absolute path of vmlinux, so that
# callers can do `k=$(scripts/build-kernel.sh)`. Everything else goes to stderr.
set -euo pipefail

# Bump when the build procedure changes in a way that changes the output.
RECIPE_VERSION=1
ARCH_MAKE=x86_64
BASE_CONFIG=tinyconfig
DEFAULT_SOURCE=/usr/src/linux-source-6.12.tar.xz
APT_HINT="apt-get install linux-source-6.12 flex bison libelf-dev bc cpio"

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
OUR_FRAGMENT="$REPO_ROOT/guest/kernel/runv.config"

usage() {
	cat <<EOF
Usage: scripts/build-kernel.sh [options]

Build the runv guest kernel (x86_64 ELF vmlinux with a PVH entry) from a
kernel source tree: 'make tinyconfig', merge guest/kernel/runv.config and any
--fragment files (in that order, later ones win), 'make olddefconfig', check
that every option the fragments set or unset survived, then 'make vmlinux'.

The result is cached; a later run with the same inputs prints the cached path
in well under a second without touching the source.

Options:
  --source PATH     kernel source: a .tar.xz/.tar.gz/.tar (one top-level
                    directory) or an unpacked tree. Default:
                    $DEFAULT_SOURCE (Debian package linux-source-6.12).
                    An unpacked tree is built out of tree (O=...), so it must
                    be clean ('make mrproper').
  --fragment FILE   extra config fragment merged after guest/kernel/runv.config
                    (repeatable), e.g. --fragment guest/kernel/pvm.config.
  --jobs N          parallel make jobs (default: nproc = $(nproc)).
  --force           rebuild even if the cache has this kernel.
  --verbose         stream the kernel build output to stderr (default: it
                    goes to a log file, whose tail is shown on failure).
  -h, --help        show this help.

Output:
  stdout: one line, the absolute path of vmlinux. Progress goes to stderr.

Cache (environment RUNV_CACHE_DIR, default \$HOME/.cache/runv):
  \$RUNV_CACHE_DIR/kernel/<version>-<hash>/vmlinux   the kernel
                                      .../config     the final .config
                                      .../key.txt    what the hash covers
  <version> is the source's kernel version (its Makefile, i.e.
  'make kernelversion'). <hash> is the first 16 hex digits of a sha256 over:
  the contents of every fragment in merge order, the source's identity
  (tarball path, size, mtime; or tree path and git HEAD/dirty state if it is a
  git checkout), the compiler version, and this script's build settings
  (ARCH=$ARCH_MAKE, base config $BASE_CONFIG, recipe v$RECIPE_VERSION).
  The build runs in \$RUNV_CACHE_DIR/kernel/work/<version>-<hash>/, which is
  deleted after a successful build.

Needs: make gcc flex bison bc libelf-dev (and for the default source:
  $APT_HINT).
EOF
}

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() {
	printf 'build-kernel: ERROR: %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------- arguments
SOURCE=""
EXTRA_FRAGMENTS=()
JOBS=$(nproc)
FORCE=0
VERBOSE=0
while [ $# -gt 0 ]; do
	case "$1" in
	--source)
		[ $# -ge 2 ] || die "--source needs an argument"
		SOURCE=$2
		shift 2
		;;
	--source=*)
		SOURCE=${1#--source=}
		shift
		;;
	--fragment)
		[ $# -ge 2 ] || die "--fragment needs an argument"
		EXTRA_FRAGMENTS+=("$2")
		shift 2
		;;
	--fragment=*)
		EXTRA_FRAGMENTS+=("${1#--fragment=}")
		shift
		;;
	--jobs)
		[ $# -ge 2 ] || die "--jobs needs an argument"
		JOBS=$2
		shift 2
		;;
	--jobs=*)
		JOBS=${1#--jobs=}
		shift
		;;
	--force)
		FORCE=1
		shift
		;;
	--verbose)
		VERBOSE=1
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		die "unknown argument: $1"
		;;
	esac
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$JOBS'"

# ---------------------------------------------------------------- inputs
if [ -z "$SOURCE" ]; then
	SOURCE=$DEFAULT_SOURCE
	if [ ! -e "$SOURCE" ]; then
		die "kernel source $SOURCE not found. Install it with:
    $APT_HINT
or pass --source <kernel tree or tarball>."
	fi
fi
[ -e "$SOURCE" ] || die "--source $SOURCE does not exist"
SOURCE=$(realpath -- "$SOURCE")

FRAGMENTS=("$OUR_FRAGMENT")
for f in "${EXTRA_FRAGMENTS[@]+"${EXTRA_FRAGMENTS[@]}"}"; do
	[ -f "$f" ] || die "--fragment $f is not a file"
	FRAGMENTS+=("$(realpath -- "$f")")
done
[ -f "$OUR_FRAGMENT" ] || die "missing $OUR_FRAGMENT"

CACHE_ROOT=${RUNV_CACHE_DIR:-${HOME:?HOME is not set}/.cache/runv}
KCACHE="$CACHE_ROOT/kernel"
mkdir -p "$KCACHE"
KCACHE=$(realpath -- "$KCACHE")

# Version from a top-level kernel Makefile (same as 'make kernelversion').
version_from_makefile() {
	awk -F' *= *' '
		$1 == "VERSION" { v = $2 } $1 == "PATCHLEVEL" { p = $2 }
		$1 == "SUBLEVEL" { s = $2 } $1 == "EXTRAVERSION" { e = $2 }
		END { if (v == "") exit 1; printf "%s.%s", v, p; if (s != "") printf ".%s", s; printf "%s\n", e }'
}

if [ -d "$SOURCE" ]; then
	SOURCE_KIND=tree
	[ -f "$SOURCE/Makefile" ] && [ -f "$SOURCE/Kconfig" ] || die "$SOURCE does not look like a kernel source tree"
	SRC_VERSION=$(make -s -C "$SOURCE" kernelversion 2>/dev/null) || SRC_VERSION=$(version_from_makefile <"$SOURCE/Makefile") ||
		die "cannot read the kernel version of $SOURCE"
	SOURCE_ID="tree $SOURCE"
	if git -C "$SOURCE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
		SOURCE_ID+=" git $(git -C "$SOURCE" rev-parse HEAD)"
		if [ -n "$(git -C "$SOURCE" status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]; then
			# A dirty tree: key on the diff so that edits make a new entry.
			SOURCE_ID+=" dirty $(git -C "$SOURCE" diff HEAD | sha256sum | cut -c1-16)"
		fi
	fi
else
	SOURCE_KIND=tarball
	case "$SOURCE" in
	*.tar.xz | *.txz) TAR_Z=-J ;;
	*.tar.gz | *.tgz) TAR_Z=-z ;;
	*.tar.bz2) TAR_Z=-j ;;
	*.tar.zst) TAR_Z=--zstd ;;
	*.tar) TAR_Z= ;;
	*) die "--source $SOURCE: not a directory or a .tar(.xz|.gz|.bz2|.zst) archive" ;;
	esac
	SOURCE_ID="tarball $SOURCE $(stat -c '%s %Y' -- "$SOURCE")"
	# Reading the version needs a (short) pass over the archive; remember it.
	VFILE="$KCACHE/.source-versions/$(printf '%s' "$SOURCE_ID" | sha256sum | cut -c1-16)"
	if [ -s "$VFILE" ]; then
		SRC_VERSION=$(cat "$VFILE")
	else
		SRC_VERSION=$(tar $TAR_Z -xOf "$SOURCE" --occurrence=1 --no-wildcards-match-slash \
			--wildcards '*/Makefile' 2>/dev/null | version_from_makefile) ||
			die "cannot read the kernel version from $SOURCE (no top-level Makefile?)"
		mkdir -p "$(dirname "$VFILE")"
		printf '%s\n' "$SRC_VERSION" >"$VFILE.$$" && mv -f "$VFILE.$$" "$VFILE"
	fi
fi
[[ "$SRC_VERSION" =~ ^[A-Za-z0-9._+-]+$ ]] || die "odd kernel version string '$SRC_VERSION'"

CC_VERSION=$( (${CC:-gcc} --version 2>/dev/null || echo "no compiler") | head -1)

# Everything the hash covers, human-readable (kept as key.txt in the cache).
key_text() {
	echo "recipe $RECIPE_VERSION"
	echo "arch $ARCH_MAKE"
	echo "base $BASE_CONFIG"
	echo "target vmlinux"
	echo "compiler $CC_VERSION"
	echo "source $SOURCE_ID"
	local f
	for f in "${FRAGMENTS[@]}"; do
		echo "fragment $f sha256 $(sha256sum <"$f" | cut -d' ' -f1)"
	done
}
KEY_TEXT=$(key_text)
# The path of a fragment is informative only: the hash covers contents and order.
HASH=$(printf '%s\n' "$KEY_TEXT" | sed -E 's/^fragment .* sha256 /fragment sha256 /' | sha256sum | cut -c1-16)
ENTRY="$SRC_VERSION-$HASH"
OUT_DIR="$KCACHE/$ENTRY"
VMLINUX="$OUT_DIR/vmlinux"

if [ "$FORCE" = 0 ] && [ -f "$VMLINUX" ]; then
	log "cached: $VMLINUX"
	echo "$VMLINUX"
	exit 0
fi

# ---------------------------------------------------------------- build
missing=()
for t in make "${CC:-gcc}" flex bison bc tar xz awk; do
	command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
[ -e /usr/include/gelf.h ] || [ -e /usr/include/libelf.h ] || missing+=("libelf-dev")
[ ${#missing[@]} -eq 0 ] || die "missing build tools: ${missing[*]}. Install them with:
    $APT_HINT"

# One build per cache entry at a time; a concurrent caller waits, then reuses.
exec 9>"$KCACHE/.lock-$ENTRY"
if ! flock -n 9; then
	log "another build of $ENTRY is running; waiting for it"
	flock 9
fi
if [ "$FORCE" = 0 ] && [ -f "$VMLINUX" ]; then
	log "cached (built by a concurrent run): $VMLINUX"
	echo "$VMLINUX"
	exit 0
fi

WORK="$KCACHE/work/$ENTRY"
rm -rf -- "$WORK"
mkdir -p "$WORK"
BUILD="$WORK/build"
BUILD_LOG="$WORK/build.log"
mkdir -p "$BUILD"
: >"$BUILD_LOG"

START=$SECONDS
log "building Linux $SRC_VERSION for runv ($ENTRY)"
log "  source:    $SOURCE"
for f in "${FRAGMENTS[@]}"; do log "  fragment:  $f"; done
log "  work dir:  $WORK (log: $BUILD_LOG)"

IN_MAKE=0
on_fail() {
	local rc=$?
	if [ $rc -ne 0 ]; then
		if [ "$IN_MAKE" = 1 ] && [ "$VERBOSE" = 0 ] && [ -s "$BUILD_LOG" ]; then
			echo "---- last lines of $BUILD_LOG ----" >&2
			tail -n 40 "$BUILD_LOG" >&2 || true
			echo "----" >&2
		fi
		log "FAILED (exit $rc); work dir kept: $WORK"
	fi
}
trap on_fail EXIT

# run_logged CMD...: output to the log (or stderr with --verbose), never stdout.
# On failure, the EXIT trap shows the log's tail.
run_logged() {
	IN_MAKE=1
	if [ "$VERBOSE" = 1 ]; then
		"$@" >&2
	else
		"$@" >>"$BUILD_LOG" 2>&1
	fi
	IN_MAKE=0
}

if [ "$SOURCE_KIND" = tarball ]; then
	SRC="$WORK/src"
	mkdir -p "$SRC"
	log "extracting $(basename "$SOURCE") ..."
	tar $TAR_Z -xf "$SOURCE" -C "$SRC" --strip-components=1
else
	SRC="$SOURCE"
	if [ -f "$SRC/.config" ] || [ -d "$SRC/include/config" ]; then
		die "$SRC is not clean (has .config or include/config); run 'make mrproper' there first"
	fi
fi

KMAKE=(make -C "$SRC" O="$BUILD" ARCH="$ARCH_MAKE" KBUILD_BUILD_USER=runv KBUILD_BUILD_HOST=runv)

log "make $BASE_CONFIG"
run_logged "${KMAKE[@]}" "$BASE_CONFIG"

log "merging fragments"
# -m: merge only; olddefconfig below resolves dependencies and defaults.
run_logged env KCONFIG_CONFIG="$BUILD/.config" \
	"$SRC/scripts/kconfig/merge_config.sh" -m -O "$BUILD" "$BUILD/.config" "${FRAGMENTS[@]}"
run_logged "${KMAKE[@]}" olddefconfig

# Every option that a fragment sets or unsets must have survived olddefconfig
# (a missing dependency silently drops an option otherwise). The last
# fragment that mentions an option wins, as in merge_config.sh.
log "checking that every fragment option survived"
declare -A WANT=() FROM=()
for f in "${FRAGMENTS[@]}"; do
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%$'\r'}
		if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			sym=${BASH_REMATCH[1]}
			val=${BASH_REMATCH[2]}
			[ "$val" = n ] && val="is not set"
		elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set[[:space:]]*$ ]]; then
			sym=${BASH_REMATCH[1]}
			val="is not set"
		else
			continue
		fi
		WANT[$sym]=$val
		FROM[$sym]=$f
	done <"$f"
done
declare -A HAVE=()
while IFS= read -r line; do
	if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		HAVE[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
	fi
done <"$BUILD/.config"
lost=0
for sym in $(printf '%s\n' "${!WANT[@]}" | sort); do
	want=${WANT[$sym]}
	have=${HAVE[$sym]-}
	if [ "$want" = "is not set" ]; then
		if [ -n "$have" ]; then
			log "LOST: $sym should be unset but .config has $sym=$have (forced by another option; from ${FROM[$sym]})"
			lost=$((lost + 1))
		fi
	elif [ "$have" != "$want" ]; then
		if [ -z "$have" ]; then
			log "LOST: $sym=$want is not set in the final .config (unmet dependency or unknown symbol; from ${FROM[$sym]})"
		else
			log "LOST: $sym=$want became $sym=$have (from ${FROM[$sym]})"
		fi
		lost=$((lost + 1))
	fi
done
if [ "$lost" -ne 0 ]; then
	cp -f "$BUILD/.config" "$WORK/config.rejected"
	# Nothing to debug in the extracted tree or the objects: free the disk.
	[ "$SOURCE_KIND" = tarball ] && rm -rf -- "$SRC"
	rm -rf -- "$BUILD"
	die "$lost fragment option(s) did not survive 'make olddefconfig' (final config: $WORK/config.rejected). Fix the fragment(s): add the missing dependencies or drop the options."
fi
log "all ${#WANT[@]} fragment options present"

log "make -j$JOBS vmlinux (this takes a few minutes) ..."
run_logged "${KMAKE[@]}" -j"$JOBS" vmlinux

[ -f "$BUILD/vmlinux" ] || die "make succeeded but $BUILD/vmlinux is missing"
# The PVH entry is an ELF note of owner "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18).
if command -v readelf >/dev/null 2>&1; then
	notes=$(readelf -n "$BUILD/vmlinux" 2>/dev/null || true)
	grep -E '^ +Xen ' <<<"$notes" | grep -qE '0x00000012|PHYS32_ENTRY' ||
		die "$BUILD/vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH=y?"
fi

# Publish atomically: a half-written entry is never visible under $OUT_DIR.
STAGE="$KCACHE/.stage-$ENTRY.$$"
rm -rf -- "$STAGE"
mkdir -p "$STAGE"
cp -f "$BUILD/vmlinux" "$STAGE/vmlinux"
cp -f "$BUILD/.config" "$STAGE/config"
printf '%s\n' "$KEY_TEXT" >"$STAGE/key.txt"
rm -rf -- "$OUT_DIR"
mv -- "$STAGE" "$OUT_DIR"

trap - EXIT
rm -rf -- "$WORK"
rmdir -- "$KCACHE/work" 2>/dev/null || true

log "built in $((SECONDS - START)) s: $VMLINUX ($(du -h "$VMLINUX" | cut -f1))"
echo "$VMLINUX"
