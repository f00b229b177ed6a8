#!/usr/bin/env bash
# Build (and optionally push) the DataDream images, tagged with the reference the pipeline compiles in.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: docker/build.sh [--print-tags] [--push] [--mlflow] [-- DOCKER_BUILD_ARGS...]

Builds docker/Dockerfile (the component image) from the repository root and tags it
  <repo>:<version>              the exact reference the pipeline compiles in
                                (components.image_reference(): $DATADREAM_IMAGE, else
                                components.DEFAULT_IMAGE = ghcr.io/datadream/datadream:<version>)
  <repo>:<version>-g<sha>       the same image, by commit (<sha> as in lineage: short sha, "-dirty"
                                when tracked files changed)
passing --build-arg VERSION and GIT_SHA (baked in as $DATADREAM_GIT_SHA for lineage).

Options:
  --print-tags   print the tags, one a line (first: the pipeline's reference), and exit; needs no Docker
  --push         push every tag after the build (refused on a dirty tree unless DATADREAM_ALLOW_DIRTY=1)
  --mlflow       build docker/mlflow/Dockerfile instead: <repo>-mlflow:<mlflow version>[-g<sha>]
  -h, --help     this text
Anything after `--` goes to `docker build` unchanged (e.g. -- --no-cache).

Environment:
  DATADREAM_IMAGE_REPO   push to another repository (keeps the tag); compile the pipeline with
                         `datadream pipeline compile --image <first tag>` (or $DATADREAM_IMAGE) to match
  DATADREAM_IMAGE        the pipeline's image override; when set, its tag is the one built
  GIT_SHA                the commit to record (default: from git in this checkout)
  DOCKER                 the container CLI (default: docker)
  PYTHON                 the Python used to read the package's reference (default: python3)
  PLATFORM               the target platform (default: linux/amd64, the platform the locks are for)
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
print_tags=0 push=0 mlflow=0
extra=()
while (($#)); do
  case "$1" in
    --print-tags) print_tags=1 ;;
    --push) push=1 ;;
    --mlflow) mlflow=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "docker/build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The one source of truth: the reference the pipeline compiles in, read from the package itself
# (components imports only datadream.__version__, so any Python 3 can read it without the venv).
ref="$(cd "$root" && PYTHONPATH="$root" "${PYTHON:-python3}" -c 'import components; print(components.image_reference())')"
if [[ "$ref" == *@* || "${ref##*/}" != *:* ]]; then
  echo "docker/build.sh: image reference '$ref' has no tag to build (expected <repo>:<tag>)" >&2
  exit 2
fi
repo="${DATADREAM_IMAGE_REPO:-${ref%:*}}"
tag="${ref##*:}"

if [[ -n "${GIT_SHA:-}" ]]; then
  sha="$GIT_SHA"
elif sha="$(git -C "$root" rev-parse --short HEAD 2>/dev/null)"; then
  # the same form as datadream.tracking.git_sha(); --no-optional-locks: read-only, no index refresh
  if [[ -n "$(git -C "$root" --no-optional-locks status --porcelain --untracked-files=no)" ]]; then
    sha="$sha-dirty"
  fi
else
  echo "docker/build.sh: not a git checkout; set GIT_SHA" >&2
  exit 2
fi

if ((mlflow)); then
  dockerfile="$root/docker/mlflow/Dockerfile"
  version="$(sed -n 's/^mlflow==//p' "$root/docker/mlflow/requirements.lock")"
  [[ -n "$version" ]] || { echo "docker/build.sh: no mlflow pin in docker/mlflow/requirements.lock" >&2; exit 2; }
  tags=("$repo-mlflow:$version" "$repo-mlflow:$version-g$sha")
else
  dockerfile="$root/docker/Dockerfile"
  version="$tag"
  tags=("$repo:$tag" "$repo:$tag-g$sha")
fi

if ((print_tags)); then
  printf '%s\n' "${tags[@]}"
  exit 0
fi

if ((push)) && [[ "$sha" == *-dirty && "${DATADREAM_ALLOW_DIRTY:-0}" != 1 ]]; then
  echo "docker/build.sh: refusing to push a build of a dirty tree ($sha); commit, or set DATADREAM_ALLOW_DIRTY=1" >&2
  exit 2
fi

docker="${DOCKER:-docker}"
tag_args=()
for t in "${tags[@]}"; do tag_args+=(--tag "$t"); done
set -x
"$docker" build --file "$dockerfile" --platform "${PLATFORM:-linux/amd64}" \
  --build-arg "VERSION=$version" --build-arg "GIT_SHA=$sha" \
  "${tag_args[@]}" "${extra[@]}" "$root"
if ((push)); then
  for t in "${tags[@]}"; do "$docker" push "$t"; done
fi
