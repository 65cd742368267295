#!/usr/bin/env bash
# Install the viewer harness of tests/test_ohif.py (idempotent; `bash .ci/run` calls it):
#   - playwright-core, from package-lock.json (`npm ci`, no install scripts: it never
#     downloads a browser; the harness drives Debian's /usr/bin/chromium);
#   - the built OHIF v3 viewer: the `dist/` folder of the npm package @ohif/app, version
#     and sha512 pinned under "ohifViewer" in package.json, fetched with `npm pack` and
#     unpacked into vendor/ohif-app-<version>/dist.
#
# Why not a plain dependency: @ohif/app's own dependencies name versions that were never
# published (@ohif/core@3.12.10 gives ETARGET), so `npm install @ohif/app` fails; the
# tarball alone holds the built viewer, which is all the harness serves.
#
# Both steps do nothing when what is installed already matches the pins; npm's cache
# (~/.npm) serves repeated downloads.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
die() { echo "ERROR: $*" >&2; exit 1; }

command -v node >/dev/null || die "node is not installed: apt-get install nodejs npm (or run bash .ci/run as root)"
command -v npm >/dev/null || die "npm is not installed: apt-get install npm (or run bash .ci/run as root)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
(( node_major >= 20 )) || die "Node.js $(node --version) is too old: playwright-core 1.65 needs Node.js 20 or newer"

# pinned NAME: a field of package.json / package-lock.json, read with node.
pinned() { node -e 'const p=require(process.argv[1]);console.log(eval("p"+process.argv[2]))' "$HERE/$1" "$2"; }

locked="$(pinned package-lock.json '.packages["node_modules/playwright-core"].version')"
installed="$( [[ -f node_modules/playwright-core/package.json ]] \
    && pinned node_modules/playwright-core/package.json '.version' || echo none)"
if [[ "$installed" != "$locked" ]]; then
    echo "playwright-core: $installed -> $locked (npm ci)"
    npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
else
    echo "playwright-core $installed: up to date"
fi

package="$(pinned package.json '.ohifViewer.package')"
version="$(pinned package.json '.ohifViewer.version')"
integrity="$(pinned package.json '.ohifViewer.integrity')"
dest="$HERE/vendor/ohif-app-$version"
if [[ -f "$dest/INTEGRITY" && "$(cat "$dest/INTEGRITY")" == "$integrity" && -f "$dest/dist/index.html" ]]; then
    echo "$package $version: up to date ($dest/dist)"
    exit 0
fi

echo "$package $version: fetching with npm pack"
work="$(mktemp -d "$HERE/.install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "$package@$version" --loglevel=error >/dev/null)
tarball="$(ls "$work"/*.tgz)"
actual="sha512-$(node -e '
    const h=require("crypto").createHash("sha512");
    h.update(require("fs").readFileSync(process.argv[1]));
    console.log(h.digest("base64"))' "$tarball")"
[[ "$actual" == "$integrity" ]] || die "$package $version: tarball integrity $actual does not match the pin $integrity in package.json"
tar -xzf "$tarball" -C "$work" package/dist package/package.json
[[ -f "$work/package/dist/index.html" ]] || die "$package $version: the tarball has no dist/index.html"
rm -rf "$dest"
mkdir -p "$dest"
mv "$work/package/dist" "$work/package/package.json" "$dest/"
echo "$integrity" > "$dest/INTEGRITY"
echo "$package $version: installed in $dest/dist ($(du -sh "$dest" | cut -f1))"
