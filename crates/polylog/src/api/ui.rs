//! The dashboard: one document of HTML, CSS and JavaScript (no external assets), served at
//! `/` (pipelines), `/changes` (the live change feed), `/search` and `/reports`; its script
//! shows the page the path names and reads the API as any client does.
//!
//! A browser without the token gets the sign-in page; `POST /login` (a plain form) checks the
//! token and sets an HttpOnly, SameSite=Strict session cookie holding a digest of it that
//! grants reads only.

use std::net::TcpStream;

use polylog_events::server::url_decode;

use super::{constant_time_eq, read_key, Api, Reply, Request, SESSION_COOKIE};

const LOGIN: &str = include_str!("login.html");
const PAGE: &str = include_str!("dashboard.html");

pub fn page(_: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    Reply::Bytes(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The sign-in page, returning to `next` afterwards.
pub fn login_page(next: &str, problem: Option<&str>) -> String {
    let problem =
        problem.map(|p| format!("<p class=\"problem\">{}</p>", escape(p))).unwrap_or_default();
    LOGIN.replace("{{next}}", &escape(next)).replace("{{problem}}", &problem)
}

/// `POST /login` with `token=...&next=/path` (form-encoded).
pub fn login(api: &Api, req: &Request, _: &[String], _: &TcpStream) -> Reply {
    let form = String::from_utf8_lossy(&req.body).into_owned();
    let field = |name: &str| {
        form.split('&').find_map(|kv| {
            kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| url_decode(v))
        })
    };
    // Only a path of this server: never a redirect elsewhere.
    let next = field("next")
        .filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or_else(|| "/".into());
    let given = field("token").unwrap_or_default();
    let Some(token) = &api.token else {
        return Reply::Headed(303, vec![("Location", next)], "text/plain", Vec::new());
    };
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        let page = login_page(&next, Some("That is not the API token."));
        return Reply::Headed(403, vec![], "text/html; charset=utf-8", page.into_bytes());
    }
    let cookie = format!("{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", read_key(token));
    Reply::Headed(303, vec![("Set-Cookie", cookie), ("Location", next)], "text/plain", Vec::new())
}
