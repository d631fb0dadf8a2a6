#!/usr/bin/env bash
# Checks that README.md and docs/*.md point only inside the repository: every Markdown link or
# image (`[text](target)`, `![alt](target)`) and every HTML `src=`/`href=` names a file or folder
# of the repository that exists (an `#anchor` after it, or alone, must be a heading of that
# page), never a URL, an absolute path or a path that climbs out; and no text names a path of a
# development machine (/work/, /home/, /root/) or a `../` path that leaves the repository.
# System paths an operator uses (/etc/romulus, /usr/lib/..., /dev/kvm) are text, not links, and
# allowed. Usage: check_links.sh [ROOT] (default: this repository). Exits 1 on the first page
# with a bad link, naming every bad link it found.
set -euo pipefail
root=$(realpath "${1:-$(dirname "$0")/..}")
cd "$root"

# GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`.
anchors() {
  grep -E '^#{1,6} ' "$1" | sed -E 's/^#+ +//; s/ +$//' | tr '[:upper:]' '[:lower:]' |
    sed -E 's/[^a-z0-9 _-]//g; s/ /-/g'
}

bad=0 links=0 pages=0
report() {
  echo "check_links: $1: $2" >&2
  bad=$((bad + 1))
}
shopt -s nullglob
for page in README.md docs/*.md; do
  pages=$((pages + 1))
  dir=$(dirname "$page")
  # Links and images (a target ends at the first space or `)`), and HTML src/href attributes.
  targets=$( (grep -oE '\]\([^) ]+' "$page" | sed -E 's/^\]\(//' || true)
             (grep -oE '(src|href)="[^"]+"' "$page" | sed -E 's/^(src|href)="//; s/"$//' || true))
  while IFS= read -r target; do
    [[ -z $target ]] && continue
    links=$((links + 1))
    if [[ $target =~ ^[a-zA-Z][a-zA-Z0-9+.-]*: ]]; then
      report "$page" "$target: a URL; link only to files of the repository"
      continue
    fi
    if [[ $target == /* ]]; then
      report "$page" "$target: an absolute path; link relative to the page"
      continue
    fi
    file=${target%%#*}
    anchor=''
    [[ $target == *#* ]] && anchor=${target#*#}
    if [[ -z $file ]]; then
      file=$page
    else
      file=$dir/$file
      resolved=$(realpath -m "$file")
      if [[ $resolved != "$root" && $resolved != "$root"/* ]]; then
        report "$page" "$target: outside the repository"
        continue
      fi
      if [[ ! -e $file ]]; then
        report "$page" "$target: no such file in the repository"
        continue
      fi
    fi
    if [[ -n $anchor && $file == *.md ]] && ! anchors "$file" | grep -qxF -- "$anchor"; then
      report "$page" "$target: $(basename "$file") has no heading with the anchor #$anchor"
    fi
  done <<<"$targets"
  # Paths in the text: a development machine's, or `../` climbing out of the repository.
  while IFS= read -r hit; do
    [[ -z $hit ]] && continue
    path=${hit#*:}
    path=/${path#*/}
    report "$page" "line ${hit%%:*} names ${path%[.,;:]}: a path of a development machine"
  done < <(grep -noE '(^|[^A-Za-z0-9_.~-])/(work|home|root)/[^ )`"]*' "$page" | sort -u || true)
  while IFS= read -r hit; do
    [[ -z $hit ]] && continue
    path=${hit#*:}
    resolved=$(realpath -m "$dir/$path")
    if [[ $resolved != "$root" && $resolved != "$root"/* ]]; then
      report "$page" "line ${hit%%:*} names $path: outside the repository"
    fi
  done < <(grep -noE '(\.\./)+[A-Za-z0-9_.-]+' "$page" | sort -u || true)
done
if ((bad > 0)); then
  echo "check_links: $bad bad links or paths in $pages pages" >&2
  exit 1
fi
echo "check_links: $links links in $pages pages, all inside the repository"
