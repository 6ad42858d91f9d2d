'use strict'
// node-postgres driver program for shardgate's driver suite (integration-tests/drivers.rs).
//
// Connection parameters come from the libpq environment variables node-postgres reads
// itself (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE); TABLE_PREFIX makes the table
// names unique per run. Every step runs on its own clients and asserts its results; the
// program prints "ok <step>" or "FAIL <step>: <error>" per step and exits non-zero if any
// step failed. Reads from another connection retry for a few seconds: through the proxy
// they may be served by a replica that lags.

const assert = require('assert')
const { pipeline } = require('stream/promises')
const { Readable, Writable } = require('stream')
const pg = require('pg')
const Cursor = require('pg-cursor')
const QueryStream = require('pg-query-stream')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')

const PREFIX = process.env.TABLE_PREFIX || `drv_node_${process.pid}`
const T_ITEMS = `${PREFIX}_items`
const T_COPY = `${PREFIX}_copy`
const T_POOL = `${PREFIX}_pool`
const T_EXT = `${PREFIX}_ext`
const ITEMS = 1000
const DEADLINE_MS = Number(process.env.DRIVER_TIMEOUT_MS || 150000)

let currentStep = 'start'
setTimeout(() => {
  console.error(`FAIL ${currentStep}: timed out after ${DEADLINE_MS} ms (hung driver or proxy)`)
  process.exit(3)
}, DEADLINE_MS).unref()

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

async function connect() {
  const client = new pg.Client({ application_name: 'drivers-node' })
  // An error event on an idle client would otherwise crash the process without a step name.
  client.on('error', (e) => console.error(`client error during ${currentStep}: ${e.message}`))
  await client.connect()
  return client
}

async function withClient(f) {
  const client = await connect()
  try {
    return await f(client)
  } finally {
    await client.end().catch(() => {})
  }
}

// Polls `check` (which throws while the expectation does not hold yet) for up to 10 s.
async function eventually(what, check) {
  const deadline = Date.now() + 10000
  for (;;) {
    try {
      return await check()
    } catch (e) {
      if (Date.now() > deadline) {
        e.message = `${what} (still failing after 10 s): ${e.message}`
        throw e
      }
      await sleep(100)
    }
  }
}

function cursorRead(cursor, n) {
  return cursor.read(n)
}

// Other clients keep the pool busy while a cursor waits between batches, so a proxy
// that hands the cursor's server connection to someone else mid-batch gets caught.
async function busyNeighbours(count, rounds) {
  const clients = []
  for (let i = 0; i < count; i++) clients.push(await connect())
  try {
    await Promise.all(
      clients.map(async (c, i) => {
        for (let r = 0; r < rounds; r++) {
          const res = await c.query('SELECT $1::int AS i, $2::int AS r', [i, r])
          assert.deepStrictEqual(res.rows[0], { i, r }, 'neighbour query answered wrongly')
        }
      })
    )
  } finally {
    await Promise.all(clients.map((c) => c.end().catch(() => {})))
  }
}

async function checkCursorRows(cursor, batch, total, between) {
  let expected = 1
  for (;;) {
    const rows = await cursorRead(cursor, batch)
    if (rows.length === 0) break
    assert.ok(rows.length <= batch, `batch of ${rows.length} > ${batch}`)
    for (const row of rows) {
      assert.strictEqual(row.id, expected, `cursor row out of sequence`)
      assert.strictEqual(row.val, `item-${expected}`)
      expected++
    }
    if (between) await between(expected)
  }
  assert.strictEqual(expected - 1, total, 'cursor returned the wrong number of rows')
}

const steps = {
  async setup() {
    await withClient(async (c) => {
      await c.query(`DROP TABLE IF EXISTS ${T_ITEMS}, ${T_COPY}, ${T_POOL}, ${T_EXT}`)
      await c.query(`CREATE TABLE ${T_ITEMS} (id int PRIMARY KEY, val text NOT NULL)`)
      await c.query(`CREATE TABLE ${T_COPY} (id int PRIMARY KEY, name text, amount numeric)`)
      await c.query(
        `CREATE TABLE ${T_POOL} (worker int, n int, payload text, PRIMARY KEY (worker, n))`
      )
      await c.query(`CREATE TABLE ${T_EXT} (id int PRIMARY KEY, note text)`)
      const r = await c.query(
        `INSERT INTO ${T_ITEMS} SELECT g, 'item-' || g FROM generate_series(1, $1::int) g`,
        [ITEMS]
      )
      assert.strictEqual(r.rowCount, ITEMS)
    })
    // Later steps read on fresh connections: wait until the rows are visible there.
    await withClient((c) =>
      eventually('setup rows visible', async () => {
        const r = await c.query(`SELECT count(*)::int AS n FROM ${T_ITEMS}`)
        assert.strictEqual(r.rows[0].n, ITEMS)
      })
    )
  },

  async cursor_outside_transaction() {
    await withClient(async (c) => {
      // No BEGIN: between reads pg-cursor has sent Execute + Flush and no Sync, so the
      // server connection is inside the implicit transaction of an unfinished batch.
      const cursor = c.query(new Cursor(`SELECT id, val FROM ${T_ITEMS} ORDER BY id`))
      await checkCursorRows(cursor, 100, ITEMS, async (next) => {
        if (next % 300 === 1) await busyNeighbours(4, 5)
        else await sleep(5)
      })
      await cursor.close()
      // A cursor closed half way, then the client is used again.
      const half = c.query(
        new Cursor(`SELECT id, val FROM ${T_ITEMS} WHERE id <= $1 ORDER BY id`, [500])
      )
      const first = await half.read(50)
      assert.strictEqual(first.length, 50)
      assert.strictEqual(first[49].id, 50)
      await busyNeighbours(4, 3)
      const second = await half.read(50)
      assert.strictEqual(second[0].id, 51)
      await half.close()
      const after = await c.query('SELECT 41 + 1 AS answer')
      assert.strictEqual(after.rows[0].answer, 42)
    })
  },

  async cursor_inside_transaction() {
    await withClient(async (c) => {
      await c.query('BEGIN')
      await c.query(`UPDATE ${T_ITEMS} SET val = val WHERE id = 1`)
      const cursor = c.query(new Cursor(`SELECT id, val FROM ${T_ITEMS} ORDER BY id`))
      await checkCursorRows(cursor, 128, ITEMS, async (next) => {
        if (next % 256 === 1) await busyNeighbours(4, 3)
      })
      await cursor.close()
      const cursor2 = c.query(new Cursor(`SELECT id, val FROM ${T_ITEMS} ORDER BY id`))
      const some = await cursor2.read(10)
      assert.strictEqual(some.length, 10)
      await cursor2.close()
      const r = await c.query('SELECT count(*)::int AS n FROM ' + T_ITEMS)
      assert.strictEqual(r.rows[0].n, ITEMS)
      await c.query('COMMIT')
      const status = await c.query('SELECT 1 AS one')
      assert.strictEqual(status.rows[0].one, 1)
    })
  },

  async query_stream_10k() {
    await withClient(async (c) => {
      const stream = c.query(
        new QueryStream(
          'SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 10000) g ORDER BY g',
          [],
          { batchSize: 250 }
        )
      )
      let count = 0
      let sum = 0
      let midHash = null
      await pipeline(
        stream,
        new Writable({
          objectMode: true,
          write(row, _enc, cb) {
            count++
            if (row.n !== count) return cb(new Error(`row ${count} has n=${row.n}`))
            sum += row.n
            if (row.n === 5000) midHash = row.h
            cb()
          },
        })
      )
      assert.strictEqual(count, 10000)
      assert.strictEqual(sum, (10000 * 10001) / 2)
      assert.strictEqual(midHash, require('crypto').createHash('md5').update('5000').digest('hex'))
      const r = await c.query('SELECT 7 AS seven')
      assert.strictEqual(r.rows[0].seven, 7)
    })
  },

  async copy_in_and_out() {
    const N = 5000
    const lines = []
    for (let i = 1; i <= N; i++) lines.push(`${i}\tname ${i}\\twith tab\t${(i * 1.25).toFixed(2)}\n`)
    await withClient(async (c) => {
      const ingest = c.query(copyFrom(`COPY ${T_COPY} (id, name, amount) FROM STDIN`))
      // Many small chunks, like a real producer.
      await pipeline(Readable.from(lines), ingest)
      assert.strictEqual(ingest.rowCount, N, 'COPY FROM reported the wrong row count')
      const r = await c.query(`SELECT count(*)::int AS n, sum(amount)::text AS s FROM ${T_COPY}`)
      assert.strictEqual(r.rows[0].n, N)
      assert.strictEqual(r.rows[0].s, ((N * (N + 1)) / 2 * 1.25).toFixed(2))

      const chunks = []
      const out = c.query(copyTo(`COPY (SELECT id, name, amount FROM ${T_COPY} ORDER BY id) TO STDOUT`))
      await pipeline(
        out,
        new Writable({
          write(chunk, _enc, cb) {
            chunks.push(chunk)
            cb()
          },
        })
      )
      const text = Buffer.concat(chunks).toString('utf8')
      assert.strictEqual(text, lines.join(''), 'COPY TO did not return what COPY FROM loaded')
      // The connection is usable after both COPYs.
      const after = await c.query('SELECT $1::text AS x', ['after-copy'])
      assert.strictEqual(after.rows[0].x, 'after-copy')

      // A failing COPY FROM rolls back and leaves the client usable.
      const bad = c.query(copyFrom(`COPY ${T_COPY} (id, name, amount) FROM STDIN`))
      let failed = null
      try {
        await pipeline(Readable.from([`${N + 1}\tok\t1\n`, `not-a-number\tbad\t1\n`]), bad)
      } catch (e) {
        failed = e
      }
      assert.ok(failed, 'COPY of a bad row did not fail')
      assert.strictEqual(failed.code, '22P02', `unexpected error ${failed && failed.message}`)
      const count = await c.query(`SELECT count(*)::int AS n FROM ${T_COPY}`)
      assert.strictEqual(count.rows[0].n, N, 'failed COPY left rows behind')
    })
  },

  async pool_parameterised_inserts() {
    const pool = new pg.Pool({ max: 8, application_name: 'drivers-node-pool' })
    pool.on('error', (e) => console.error(`pool error: ${e.message}`))
    const WORKERS = 12
    const PER = 20
    try {
      await Promise.all(
        Array.from({ length: WORKERS }, async (_, w) => {
          for (let n = 0; n < PER; n++) {
            const payload = `w${w}-n${n}-${'x'.repeat((w * 7 + n) % 50)}`
            const client = await pool.connect()
            try {
              const ins = await client.query({
                name: 'pool_insert',
                text: `INSERT INTO ${T_POOL} (worker, n, payload) VALUES ($1, $2, $3) RETURNING payload`,
                values: [w, n, payload],
              })
              assert.strictEqual(ins.rows[0].payload, payload)
              // Same connection: read-your-writes must show the row at once.
              const sel = await client.query({
                name: 'pool_select',
                text: `SELECT payload FROM ${T_POOL} WHERE worker = $1 AND n = $2`,
                values: [w, n],
              })
              assert.strictEqual(sel.rows.length, 1, `row (${w}, ${n}) not read back`)
              assert.strictEqual(sel.rows[0].payload, payload)
            } finally {
              client.release()
            }
          }
        })
      )
      await eventually('all pool rows visible', async () => {
        const r = await pool.query(
          `SELECT count(*)::int AS n, count(DISTINCT worker)::int AS w FROM ${T_POOL}`
        )
        assert.deepStrictEqual(r.rows[0], { n: WORKERS * PER, w: WORKERS })
      })
      const r = await pool.query(`SELECT worker, n, payload FROM ${T_POOL} WHERE worker = $1 ORDER BY n`, [3])
      assert.strictEqual(r.rows.length, PER)
      r.rows.forEach((row, n) => {
        assert.strictEqual(row.n, n)
        assert.ok(row.payload.startsWith(`w3-n${n}-`), `unexpected payload ${row.payload}`)
      })
    } finally {
      await pool.end()
    }
  },

  async extended_insert_committed() {
    // INSERT via the extended protocol (Parse/Bind/Execute/Sync), then check from ANOTHER
    // connection that it is committed. A write left uncommitted on a server connection
    // would never become visible there.
    await withClient(async (writer) => {
      for (let i = 1; i <= 5; i++) {
        const r = await writer.query(`INSERT INTO ${T_EXT} (id, note) VALUES ($1, $2)`, [i, `note ${i}`])
        assert.strictEqual(r.rowCount, 1)
      }
      await withClient(async (reader) => {
        await eventually('extended-protocol inserts visible from another connection', async () => {
          const r = await reader.query(`SELECT id, note FROM ${T_EXT} ORDER BY id`)
          assert.deepStrictEqual(
            r.rows,
            [1, 2, 3, 4, 5].map((id) => ({ id, note: `note ${id}` }))
          )
        })
        // In a transaction of its own the reader must also see them (served by the primary).
        await reader.query('BEGIN')
        const r = await reader.query(`SELECT id FROM ${T_EXT} ORDER BY id FOR SHARE`)
        assert.deepStrictEqual(r.rows.map((row) => row.id), [1, 2, 3, 4, 5])
        await reader.query('COMMIT')
      })
      // The writer's connection is not stuck in a transaction.
      const tx = await writer.query('SELECT now() = statement_timestamp() AS fresh')
      assert.strictEqual(tx.rows[0].fresh, true, 'writer still inside an open transaction')
    })
    // Once the writer has gone, the rows are still there (nothing was rolled back).
    await withClient((c) =>
      eventually('inserts survive the writer disconnecting', async () => {
        const r = await c.query(`SELECT count(*)::int AS n FROM ${T_EXT}`)
        assert.strictEqual(r.rows[0].n, 5)
      })
    )
  },
}

async function main() {
  const failures = []
  for (const [name, step] of Object.entries(steps)) {
    currentStep = name
    const started = Date.now()
    try {
      await step()
      console.log(`ok ${name} (${Date.now() - started} ms)`)
    } catch (e) {
      failures.push(name)
      console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`)
      if (name === 'setup') break
    }
  }
  currentStep = 'cleanup'
  try {
    await withClient((c) => c.query(`DROP TABLE IF EXISTS ${T_ITEMS}, ${T_COPY}, ${T_POOL}, ${T_EXT}`))
  } catch (e) {
    console.log(`warning: cleanup failed: ${e.message}`)
  }
  if (failures.length) {
    console.log(`node-postgres: ${failures.length} step(s) failed: ${failures.join(', ')}`)
    process.exit(1)
  }
  console.log('node-postgres: all steps passed')
  process.exit(0)
}

main().catch((e) => {
  console.log(`FAIL ${currentStep}: ${e && e.stack ? e.stack : e}`)
  process.exit(1)
})
