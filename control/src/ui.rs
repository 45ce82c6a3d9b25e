//! UI: the rollout dashboard's page and assets at `GET /ui`, embedded in
//! the binary, served with a strict Content-Security-Policy; the page reads
//! `GET /v1/dashboard` (served by the API) once a second, and a service's
//! tap stream while its "Live requests" panel is open.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use http_body_util::Full;
use hyper::Response;

/// Scripts, styles and data from this origin only; nothing inline, no
/// framing, no forms posting elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; \
form-action 'none'";

/// The embedded files: path under `/ui`, content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../ui/app.css"),
    ),
    (
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "vendor/uplot/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../ui/vendor/uplot/uPlot.min.css"),
    ),
    (
        "vendor/uplot/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../ui/vendor/uplot/LICENSE"),
    ),
];

/// `GET /ui/{rest}` (`rest` empty for the page): the file, or 404. The
/// page and assets hold no data, so they need no token: the page asks for
/// one when `GET /v1/dashboard` says it is needed.
pub fn asset(rest: &str) -> Response<Full<Bytes>> {
    let found = FILES.iter().find(|(path, _, _)| *path == rest);
    let (status, content_type, body) = match found {
        Some((_, content_type, bytes)) => {
            (StatusCode::OK, *content_type, Bytes::from_static(bytes))
        }
        None => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(headers);
    // Small files, and a new binary may change them: revalidate each time.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The headers every dashboard answer carries.
pub fn secure(headers: &mut http::HeaderMap) {
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        let page = String::from_utf8_lossy(FILES[0].2);
        // Nothing inline: every script and style is a file served here.
        assert!(!page.contains("<style"), "{page}");
        assert!(!page.contains("style="), "{page}");
        for src in page
            .split("src=\"")
            .skip(1)
            .chain(page.split("href=\"").skip(1))
        {
            let path = src.split('"').next().unwrap_or("");
            let rest = path.strip_prefix("/ui/").unwrap_or("(not under /ui/)");
            assert!(
                FILES.iter().any(|(p, _, _)| *p == rest),
                "{path} is not an embedded file"
            );
        }
        assert_eq!(asset("nope").status(), StatusCode::NOT_FOUND);
        let resp = asset("app.js");
        assert_eq!(resp.headers()["content-security-policy"], CSP);
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    }
}
