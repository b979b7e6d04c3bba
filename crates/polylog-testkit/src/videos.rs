//! The videos workload shared by the views oracle and the chaos harness: a schema of videos,
//! publishers (with countries), tags and a link table; a view of it as nested documents; the
//! same documents computed by Postgres' LEFT JOINs; and random transactions over it.

use crate::Rng;

pub const SCHEMA: &str = "
    CREATE TABLE countries (code text PRIMARY KEY, name text);
    CREATE TABLE publishers (id int PRIMARY KEY, name text, country text);
    CREATE TABLE videos (id int PRIMARY KEY, title text, publisher_id int, secret text);
    CREATE TABLE tags (id int PRIMARY KEY, label text);
    CREATE TABLE video_tags (video_id int, tag_id int, pos int, PRIMARY KEY (video_id, tag_id));
";

/// Videos with their publisher (and the publisher's country: two levels) and their tags
/// (through the link table, each with its tag: two levels).
pub const VIEW: &str = r#"
    root = "app.public.videos"
    fields = ["id", "title", "publisher_id"]
    rename = { title = "headline" }

    [[joins]]
    name = "publisher"
    topic = "app.public.publishers"
    on = { publisher_id = "id" }
    kind = "one"
    joins = [{ name = "origin", topic = "app.public.countries", on = { country = "code" }, kind = "one" }]

    [[joins]]
    name = "tags"
    topic = "app.public.video_tags"
    on = { id = "video_id" }
    kind = "many"
    fields = ["pos"]
    order_by = ["pos"]
    joins = [{ name = "tag", topic = "app.public.tags", on = { tag_id = "id" }, kind = "one" }]
"#;

/// The same documents, computed by Postgres.
pub const ORACLE: &str = "
    SELECT jsonb_build_object('id', v.id)::text || chr(9) || jsonb_build_object(
        'id', v.id, 'headline', v.title, 'publisher_id', v.publisher_id,
        'publisher', CASE WHEN p.id IS NULL THEN NULL ELSE jsonb_build_object(
            'id', p.id, 'name', p.name, 'country', p.country,
            'origin', CASE WHEN c.code IS NULL THEN NULL ELSE jsonb_build_object('code', c.code, 'name', c.name) END)
        END,
        'tags', COALESCE((
            SELECT jsonb_agg(jsonb_build_object('pos', vt.pos, 'tag',
                       CASE WHEN t.id IS NULL THEN NULL ELSE jsonb_build_object('id', t.id, 'label', t.label) END)
                   ORDER BY vt.pos, vt.video_id, vt.tag_id)
            FROM video_tags vt LEFT JOIN tags t ON t.id = vt.tag_id
            WHERE vt.video_id = v.id), '[]'::jsonb))::text
    FROM videos v
    LEFT JOIN publishers p ON p.id = v.publisher_id
    LEFT JOIN countries c ON c.code = p.country";

/// One random statement of the workload.
pub fn statement(rng: &mut Rng) -> String {
    let country = |rng: &mut Rng| ["'fr'", "'de'", "'us'", "'it'"][rng.below(4) as usize];
    let maybe = |rng: &mut Rng, n: u64| {
        if rng.chance(10) {
            "NULL".to_string()
        } else {
            rng.below(n).to_string()
        }
    };
    match rng.below(20) {
        0..=3 => format!(
            "INSERT INTO videos VALUES ({}, 't{}', {}, 's') ON CONFLICT (id) DO UPDATE SET title = excluded.title, publisher_id = excluded.publisher_id",
            rng.below(40), rng.below(9), maybe(rng, 8)
        ),
        4 => format!("DELETE FROM videos WHERE id = {}", rng.below(40)),
        5 => {
            let (a, b) = (rng.below(40), rng.below(40));
            format!("UPDATE videos SET id = {a} WHERE id = {b} AND NOT EXISTS (SELECT 1 FROM videos WHERE id = {a})")
        }
        6 => format!("UPDATE videos SET secret = 'x{}' WHERE id = {}", rng.below(9), rng.below(40)),
        7 | 8 => format!(
            "INSERT INTO publishers VALUES ({}, 'p{}', {}) ON CONFLICT (id) DO UPDATE SET name = excluded.name, country = excluded.country",
            rng.below(8), rng.below(9), if rng.chance(10) { "NULL" } else { country(rng) }
        ),
        9 => format!("DELETE FROM publishers WHERE id = {}", rng.below(8)),
        10 => {
            let (a, b) = (rng.below(8), rng.below(8));
            format!("UPDATE publishers SET id = {a} WHERE id = {b} AND NOT EXISTS (SELECT 1 FROM publishers WHERE id = {a})")
        }
        11 => format!(
            "INSERT INTO countries VALUES ({}, 'c{}') ON CONFLICT (code) DO UPDATE SET name = excluded.name",
            country(rng), rng.below(9)
        ),
        12 => format!("DELETE FROM countries WHERE code = {}", country(rng)),
        13 => format!(
            "INSERT INTO tags VALUES ({}, 'l{}') ON CONFLICT (id) DO UPDATE SET label = excluded.label",
            rng.below(10), rng.below(9)
        ),
        14 => format!("DELETE FROM tags WHERE id = {}", rng.below(10)),
        15 | 16 => format!(
            "INSERT INTO video_tags VALUES ({}, {}, {}) ON CONFLICT (video_id, tag_id) DO UPDATE SET pos = excluded.pos",
            rng.below(40), rng.below(10), rng.below(4)
        ),
        17 => format!("DELETE FROM video_tags WHERE video_id = {} OR tag_id = {}", rng.below(40), rng.below(10)),
        18 => {
            let (v, a, b) = (rng.below(40), rng.below(10), rng.below(10));
            format!("UPDATE video_tags SET tag_id = {a} WHERE video_id = {v} AND tag_id = {b} AND NOT EXISTS (SELECT 1 FROM video_tags WHERE video_id = {v} AND tag_id = {a})")
        }
        _ => {
            if rng.chance(10) {
                "TRUNCATE video_tags".to_string()
            } else {
                format!("UPDATE video_tags SET pos = pos + 1 WHERE video_id = {}", rng.below(40))
            }
        }
    }
}

/// A random transaction of 1 to 6 statements.
pub fn transaction(rng: &mut Rng) -> String {
    let n = 1 + rng.below(6);
    let stmts: Vec<String> = (0..n).map(|_| statement(rng)).collect();
    format!("BEGIN; {}; COMMIT;", stmts.join("; "))
}
