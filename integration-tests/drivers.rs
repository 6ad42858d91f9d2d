//! Real drivers (node-postgres, pgjdbc, psycopg2, sqlx) run through the proxy and, as a
//! control, directly against the primary.

mod common;
