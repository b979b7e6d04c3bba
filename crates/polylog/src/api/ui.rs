//! The dashboard: one document of HTML, CSS and JavaScript (no external assets), served at
//! `/` (pipelines), `/changes` (the live change feed), `/search` and `/reports`; its script
//! shows the page the path names and reads the API as any client does. A browser without the
//! token gets [`LOGIN`], which stores it in the `polylog_token` cookie.

use std::net::TcpStream;

use super::{Api, Reply, Request};

pub const LOGIN: &str = include_str!("login.html");
const PAGE: &str = include_str!("dashboard.html");

pub fn page(_: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    Reply::Bytes(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
}
